//! Token auth on the web report: `Authorization: Bearer <JWT>` or the sign-in cookie.
//!
//! Browsers cannot put a header on an `EventSource`, so the report has a sign-in page: `GET
//! /signin` is a form, `POST /signin` takes a token once, checks it, and keeps it in the cookie
//! [`COOKIE`] (`HttpOnly; Secure; SameSite=Strict; Path=/`, living no longer than the token).
//! `POST /signout` clears it.
//!
//! [`require`], the middleware, answers for everything else:
//! * no valid token: `401` with a JSON `{"error": ...}` under `/api/` and on `/metrics`, a
//!   redirect to `/signin` for pages (clearing a stale cookie);
//! * `/metrics` needs `admin` (`403` naming it);
//! * `/` (the overview of every user) with a token limited to its own user: a redirect to
//!   `/users/<sub>`;
//! * otherwise the [`Principal`] goes into the request's extensions, and each API handler
//!   checks what it reads (`403` naming the scope).

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Redirect, Response};

use super::{AuthError, Authenticator, Principal, Scope};

/// The cookie the sign-in page sets.
pub const COOKIE: &str = "spendflow_token";

/// Paths served without a token: the sign-in page and the static files it uses.
fn is_open(path: &str) -> bool {
    matches!(path, "/signin" | "/signout" | "/favicon.ico") || path.starts_with("/assets/")
}

/// Answers under these paths are JSON (`401`), not redirects.
fn is_api(path: &str) -> bool {
    path.starts_with("/api/") || path == "/metrics"
}

/// The token of a request: its `Authorization: Bearer` header, else the sign-in cookie.
/// `Ok(None)`: neither. The bool is true when it came from the cookie.
fn token_of(headers: &HeaderMap) -> Result<Option<(String, bool)>, AuthError> {
    if let Some(value) = headers.get(header::AUTHORIZATION) {
        let value = value.to_str().map_err(|_| {
            AuthError::Unauthenticated("the Authorization header is not text".into())
        })?;
        let token = value
            .strip_prefix("Bearer ")
            .or_else(|| value.strip_prefix("bearer "))
            .ok_or_else(|| {
                AuthError::Unauthenticated("the Authorization header must be `Bearer <JWT>`".into())
            })?;
        return Ok(Some((token.trim().to_string(), false)));
    }
    Ok(cookie(headers).map(|token| (token, true)))
}

/// The value of the [`COOKIE`] cookie, if the request has it.
fn cookie(headers: &HeaderMap) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(name, _)| *name == COOKIE)
        .map(|(_, value)| value.trim().to_string())
        .filter(|value| !value.is_empty())
}

/// A JSON error answer, as the API writes them.
pub fn json_error(status: StatusCode, message: &str) -> Response {
    let body = serde_json::json!({ "error": message, "status": status.as_u16() });
    let mut response = (
        status,
        [(header::CACHE_CONTROL, "no-store")],
        axum::Json(body),
    )
        .into_response();
    if status == StatusCode::UNAUTHORIZED {
        response
            .headers_mut()
            .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
    }
    response
}

/// The HTTP answer to an [`AuthError`] under `/api/`.
pub fn error_response(e: &AuthError) -> Response {
    let status = match e {
        AuthError::Unauthenticated(_) => StatusCode::UNAUTHORIZED,
        AuthError::Denied(_) => StatusCode::FORBIDDEN,
        AuthError::TooMany(_) => StatusCode::TOO_MANY_REQUESTS,
        AuthError::Key { .. } => StatusCode::INTERNAL_SERVER_ERROR,
    };
    json_error(status, &e.to_string())
}

/// A `Set-Cookie` value that removes the sign-in cookie.
fn clear_cookie() -> HeaderValue {
    HeaderValue::from_str(&format!(
        "{COOKIE}=; HttpOnly; Secure; SameSite=Strict; Path=/; Max-Age=0"
    ))
    .unwrap_or_else(|_| HeaderValue::from_static(""))
}

/// The middleware of a web report with auth on (see the module's description).
pub async fn require(
    State(auth): State<Arc<Authenticator>>,
    mut request: Request,
    next: Next,
) -> Response {
    let path = request.uri().path().to_string();
    if is_open(&path) {
        return next.run(request).await;
    }
    let token = token_of(request.headers());
    let from_cookie = matches!(token, Ok(Some((_, true))));
    let principal = token.and_then(|token| match token {
        Some((token, _)) => auth.authenticate(&token),
        None => Err(AuthError::Unauthenticated(
            "not signed in: send `Authorization: Bearer <JWT>` or sign in at /signin".into(),
        )),
    });
    let principal = match principal {
        Ok(principal) => principal,
        Err(e) => {
            let mut response = if is_api(&path) {
                error_response(&e)
            } else {
                Redirect::to("/signin").into_response()
            };
            if from_cookie {
                response
                    .headers_mut()
                    .insert(header::SET_COOKIE, clear_cookie());
            }
            return response;
        }
    };
    if path == "/metrics"
        && let Err(e) = principal.require(Scope::Admin)
    {
        return error_response(&e);
    }
    if path == "/"
        && let Some(own) = principal.own_user()
    {
        return Redirect::to(&format!("/users/{own}")).into_response();
    }
    request.extensions_mut().insert(principal);
    next.run(request).await
}

/// True if a form post comes from a page of this server: no `Origin` (not a browser's
/// cross-site post), or one whose host is the request's `Host`.
fn same_origin(headers: &HeaderMap) -> bool {
    let Some(origin) = headers.get(header::ORIGIN).and_then(|v| v.to_str().ok()) else {
        return true;
    };
    let Some(host) = headers.get(header::HOST).and_then(|v| v.to_str().ok()) else {
        return false;
    };
    origin
        .strip_prefix("http://")
        .or_else(|| origin.strip_prefix("https://"))
        .is_some_and(|origin_host| origin_host == host)
}

/// Escapes text for HTML.
fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
        .replace('\'', "&#39;")
}

/// The sign-in page, with an error message if the last attempt failed.
fn signin_page(status: StatusCode, error: Option<&str>) -> Response {
    let error = error.map_or_else(String::new, |e| {
        format!(
            "<p class=\"error\" role=\"alert\" data-testid=\"signin-error\">{}</p>",
            escape(e)
        )
    });
    let html = format!(
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\
         <title>Sign in · spendflow</title>\
         <link rel=\"icon\" href=\"/assets/icon.svg\" type=\"image/svg+xml\">\
         <link rel=\"stylesheet\" href=\"/assets/style.css\"></head><body>\
         <main class=\"page\" id=\"main\"><h1>Sign in</h1>\
         <p>This report needs an access token (a JWT from your identity provider, or \
         <code>spendflow token</code> for development). It is kept in a cookie only this \
         server reads, until it expires or you sign out.</p>{error}\
         <form method=\"post\" action=\"/signin\" data-testid=\"signin-form\">\
         <p><label for=\"token\">Access token</label><br>\
         <textarea id=\"token\" name=\"token\" rows=\"6\" cols=\"60\" required \
         autocomplete=\"off\" spellcheck=\"false\" data-testid=\"signin-token\"></textarea></p>\
         <p><button type=\"submit\" data-testid=\"signin-submit\">Sign in</button></p>\
         </form></main></body></html>"
    );
    (
        status,
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (header::CACHE_CONTROL, "no-store"),
            (
                header::CONTENT_SECURITY_POLICY,
                "default-src 'self'; style-src 'self'; script-src 'none'; form-action 'self'; \
                 object-src 'none'; base-uri 'none'; frame-ancestors 'none'",
            ),
        ],
        html,
    )
        .into_response()
}

/// `GET /signin` (auth off: there is nothing to sign in to; back to the report).
pub async fn signin_form(auth: Option<Arc<Authenticator>>) -> Response {
    match auth {
        Some(_) => signin_page(StatusCode::OK, None),
        None => Redirect::to("/").into_response(),
    }
}

/// `POST /signin` with the form's `token`: sets the cookie and goes to the report (a token
/// limited to its own user: that user's page), or shows the form again saying why not.
pub async fn signin(
    auth: Option<Arc<Authenticator>>,
    headers: &HeaderMap,
    token: &str,
) -> Response {
    let Some(auth) = auth else {
        return Redirect::to("/").into_response();
    };
    if !same_origin(headers) {
        return signin_page(
            StatusCode::FORBIDDEN,
            Some("the sign-in form must be sent from this server's own page"),
        );
    }
    let token = token.trim();
    let principal: Principal = match auth.authenticate(token) {
        Ok(principal) => principal,
        Err(e) => return signin_page(StatusCode::UNAUTHORIZED, Some(&e.to_string())),
    };
    let now = jsonwebtoken::get_current_timestamp();
    let max_age = principal.expires_at.saturating_sub(now).max(1);
    let Ok(cookie) = HeaderValue::from_str(&format!(
        "{COOKIE}={token}; HttpOnly; Secure; SameSite=Strict; Path=/; Max-Age={max_age}"
    )) else {
        return signin_page(
            StatusCode::BAD_REQUEST,
            Some("the token has characters a cookie cannot hold"),
        );
    };
    let target = match principal.own_user() {
        Some(own) => format!("/users/{own}"),
        None => "/".to_string(),
    };
    let mut response = Redirect::to(&target).into_response();
    response.headers_mut().insert(header::SET_COOKIE, cookie);
    response
        .headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

/// `POST /signout`: clears the cookie and shows the sign-in page.
pub async fn signout(headers: &HeaderMap) -> Response {
    if !same_origin(headers) {
        return json_error(
            StatusCode::FORBIDDEN,
            "sign out from this server's own page",
        );
    }
    let mut response = Redirect::to("/signin").into_response();
    response
        .headers_mut()
        .insert(header::SET_COOKIE, clear_cookie());
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_token_comes_from_the_header_or_the_cookie() {
        let mut headers = HeaderMap::new();
        assert!(token_of(&headers).unwrap().is_none());
        headers.insert(
            header::COOKIE,
            HeaderValue::from_static("a=1; spendflow_token=abc.def.ghi; b=2"),
        );
        assert_eq!(
            token_of(&headers).unwrap(),
            Some(("abc.def.ghi".to_string(), true))
        );
        headers.insert(
            header::AUTHORIZATION,
            HeaderValue::from_static("Bearer x.y.z"),
        );
        assert_eq!(
            token_of(&headers).unwrap(),
            Some(("x.y.z".to_string(), false))
        );
        headers.insert(
            header::AUTHORIZATION,
            HeaderValue::from_static("Basic eA=="),
        );
        assert!(token_of(&headers).is_err());
    }

    #[test]
    fn sign_in_posts_must_come_from_this_server() {
        let mut headers = HeaderMap::new();
        headers.insert(header::HOST, HeaderValue::from_static("127.0.0.1:8080"));
        assert!(same_origin(&headers));
        headers.insert(
            header::ORIGIN,
            HeaderValue::from_static("http://127.0.0.1:8080"),
        );
        assert!(same_origin(&headers));
        headers.insert(
            header::ORIGIN,
            HeaderValue::from_static("https://evil.example"),
        );
        assert!(!same_origin(&headers));
        assert_eq!(
            escape("<a href=\"x\">&"),
            "&lt;a href=&quot;x&quot;&gt;&amp;"
        );
    }
}
