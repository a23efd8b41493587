//! Token auth on gRPC: an interceptor that validates `authorization: Bearer <JWT>` and puts
//! the [`Caller`] into the request's extensions, and the statuses of [`AuthError`]s.

use std::sync::Arc;

use tonic::service::Interceptor;
use tonic::service::interceptor::InterceptedService;
use tonic::{Request, Status};

use super::{AuthError, Authenticator, Principal, Scope, StreamGuard};

/// The authenticated caller of a request: its principal, and the authenticator (for the
/// per-token stream cap).
#[derive(Clone, Debug)]
pub struct Caller {
    /// Who called.
    pub principal: Principal,
    /// Who checked.
    pub auth: Arc<Authenticator>,
}

impl Caller {
    /// Counts a stream for the caller's token ([`Authenticator::open_stream`]).
    ///
    /// # Errors
    ///
    /// `RESOURCE_EXHAUSTED` naming the cap.
    pub fn open_stream(&self) -> Result<StreamGuard, Status> {
        self.auth.open_stream(&self.principal).map_err(status)
    }
}

/// Validates the bearer token of every call when auth is on; passes every call when it is
/// off. Missing, expired or badly signed tokens: `UNAUTHENTICATED`.
#[derive(Clone, Debug)]
pub struct Authenticate {
    auth: Option<Arc<Authenticator>>,
    /// A scope every call of the service needs (`Admin/*`: `admin`).
    required: Option<Scope>,
}

impl Interceptor for Authenticate {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        let Some(auth) = &self.auth else {
            return Ok(request);
        };
        let header =
            match request.metadata().get("authorization") {
                None => None,
                Some(value) => Some(value.to_str().map_err(|_| {
                    Status::unauthenticated("the authorization metadata is not text")
                })?),
            };
        let principal = auth.authenticate_header(header).map_err(status)?;
        if let Some(scope) = self.required {
            principal.require(scope).map_err(status)?;
        }
        request.extensions_mut().insert(Caller {
            principal,
            auth: Arc::clone(auth),
        });
        Ok(request)
    }
}

/// `service` behind [`Authenticate`] with `auth` (`None`: auth off, every call passes).
pub fn intercept<S>(
    service: S,
    auth: Option<&Arc<Authenticator>>,
) -> InterceptedService<S, Authenticate> {
    InterceptedService::new(
        service,
        Authenticate {
            auth: auth.cloned(),
            required: None,
        },
    )
}

/// Like [`intercept`], and every call needs `scope` (`PERMISSION_DENIED` naming it).
pub fn intercept_requiring<S>(
    service: S,
    auth: Option<&Arc<Authenticator>>,
    scope: Scope,
) -> InterceptedService<S, Authenticate> {
    InterceptedService::new(
        service,
        Authenticate {
            auth: auth.cloned(),
            required: Some(scope),
        },
    )
}

/// The caller of `request`, if auth is on (`None`: auth off; everything is allowed).
pub fn caller<T>(request: &Request<T>) -> Option<Caller> {
    request.extensions().get::<Caller>().cloned()
}

/// Runs `check` on the principal of `request` when auth is on.
///
/// # Errors
///
/// The status of the check's [`AuthError`].
pub fn check<T>(
    request: &Request<T>,
    check: impl FnOnce(&Principal) -> Result<(), AuthError>,
) -> Result<(), Status> {
    match request.extensions().get::<Caller>() {
        Some(caller) => check(&caller.principal).map_err(status),
        None => Ok(()),
    }
}

/// The gRPC status of an [`AuthError`].
pub fn status(e: AuthError) -> Status {
    match e {
        AuthError::Unauthenticated(m) => Status::unauthenticated(m),
        AuthError::Denied(m) => Status::permission_denied(m),
        AuthError::TooMany(m) => Status::resource_exhausted(m),
        e @ AuthError::Key { .. } => Status::internal(e.to_string()),
    }
}
