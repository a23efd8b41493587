//! Test helpers for the web report: a minimal HTTP/1.1 client over `std::net::TcpStream`, and
//! a browser: Debian's `chromedriver` with headless Chromium, driven over W3C WebDriver by
//! `fantoccini`.
//!
//! The HTTP client is small on purpose: the tests need GET/POST with JSON and a streamed
//! response for server-sent events, read byte for byte (headers, chunking) as a browser gets
//! them. The browser is blocking for the tests: each command runs on a runtime of its own.
#![allow(dead_code)] // each test binary uses its own subset

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

/// An HTTP response.
#[derive(Debug)]
pub struct Response {
    pub status: u16,
    /// Header names in lowercase.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Response {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    #[track_caller]
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.text()))
    }
}

fn write_request(
    stream: &mut TcpStream,
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<&[u8]>,
) {
    let mut request = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    for (name, value) in headers {
        request.push_str(&format!("{name}: {value}\r\n"));
    }
    if let Some(body) = body {
        request.push_str(&format!(
            "Content-Type: application/json\r\nContent-Length: {}\r\n",
            body.len()
        ));
    }
    request.push_str("\r\n");
    stream.write_all(request.as_bytes()).expect("write request");
    if let Some(body) = body {
        stream.write_all(body).expect("write body");
    }
}

fn read_head(reader: &mut impl BufRead) -> (u16, Vec<(String, String)>) {
    let mut line = String::new();
    reader.read_line(&mut line).expect("status line");
    let status = line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("bad status line {line:?}"));
    let mut headers = Vec::new();
    loop {
        line.clear();
        reader.read_line(&mut line).expect("header line");
        let trimmed = line.trim_end();
        if trimmed.is_empty() {
            break;
        }
        if let Some((name, value)) = trimmed.split_once(':') {
            headers.push((name.trim().to_ascii_lowercase(), value.trim().to_string()));
        }
    }
    (status, headers)
}

/// Sends one request and reads the whole response (the server closes the connection).
pub fn request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<&[u8]>,
) -> Response {
    let mut stream = TcpStream::connect(addr).unwrap_or_else(|e| panic!("connect {addr}: {e}"));
    stream
        .set_read_timeout(Some(Duration::from_secs(60)))
        .unwrap();
    write_request(&mut stream, addr, method, path, headers, body);
    let mut reader = BufReader::new(stream);
    let (status, headers) = read_head(&mut reader);
    let chunked = headers
        .iter()
        .any(|(n, v)| n == "transfer-encoding" && v.contains("chunked"));
    let length = headers
        .iter()
        .find(|(n, _)| n == "content-length")
        .and_then(|(_, v)| v.parse::<usize>().ok());
    let mut body = Vec::new();
    if status == 304 || status == 204 || method == "HEAD" {
        // No body.
    } else if chunked {
        loop {
            let mut size = String::new();
            reader.read_line(&mut size).expect("chunk size");
            let size = usize::from_str_radix(size.trim().split(';').next().unwrap_or(""), 16)
                .expect("chunk size is hex");
            if size == 0 {
                break;
            }
            let mut chunk = vec![0; size + 2];
            reader.read_exact(&mut chunk).expect("chunk");
            body.extend_from_slice(&chunk[..size]);
        }
    } else if let Some(length) = length {
        body.resize(length, 0);
        reader.read_exact(&mut body).expect("body");
    } else {
        reader.read_to_end(&mut body).expect("body");
    }
    Response {
        status,
        headers,
        body,
    }
}

pub fn get(addr: SocketAddr, path: &str) -> Response {
    request(addr, "GET", path, &[], None)
}

/// A server-sent event stream being read.
pub struct EventStream {
    reader: BufReader<TcpStream>,
    pub status: u16,
    pub headers: Vec<(String, String)>,
}

/// One server-sent event.
#[derive(Debug)]
pub struct SseEvent {
    pub event: String,
    pub data: String,
}

impl EventStream {
    pub fn open(addr: SocketAddr, path: &str) -> EventStream {
        Self::open_with(addr, path, &[])
    }

    /// Like [`EventStream::open`], with more request headers (`Authorization`, `Cookie`).
    pub fn open_with(addr: SocketAddr, path: &str, headers: &[(&str, &str)]) -> EventStream {
        let mut stream = TcpStream::connect(addr).expect("connect");
        stream
            .set_read_timeout(Some(Duration::from_secs(20)))
            .unwrap();
        let mut all = vec![("Accept", "text/event-stream")];
        all.extend_from_slice(headers);
        write_request(&mut stream, addr, "GET", path, &all, None);
        let mut reader = BufReader::new(stream);
        let (status, headers) = read_head(&mut reader);
        EventStream {
            reader,
            status,
            headers,
        }
    }

    /// The next event (comments and keep-alives skipped). Handles chunked framing by
    /// skipping the chunk-size lines, which never look like `field: value`.
    pub fn next(&mut self) -> SseEvent {
        let mut event = String::new();
        let mut data = String::new();
        loop {
            let mut line = String::new();
            let n = self.reader.read_line(&mut line).expect("read event stream");
            assert!(n > 0, "the event stream ended");
            let line = line.trim_end_matches(['\r', '\n']);
            if line.is_empty() {
                if !data.is_empty() || !event.is_empty() {
                    return SseEvent { event, data };
                }
                continue;
            }
            if let Some(value) = line.strip_prefix("event:") {
                event = value.trim().to_string();
            } else if let Some(value) = line.strip_prefix("data:") {
                data.push_str(value.trim_start());
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// WebDriver
// ---------------------------------------------------------------------------------------------

pub const CHROMIUM: &str = "/usr/bin/chromium";
pub const CHROMEDRIVER: &str = "/usr/bin/chromedriver";

/// A chromedriver process and one browser session in it; both end on drop.
pub struct Browser {
    driver: Child,
    runtime: tokio::runtime::Runtime,
    client: Option<fantoccini::Client>,
}

impl Browser {
    /// Starts chromedriver and a headless Chromium session with a 1366×768 window. Panics,
    /// naming the Debian packages, if either program is missing.
    pub fn start() -> Browser {
        for (path, package) in [(CHROMIUM, "chromium"), (CHROMEDRIVER, "chromium-driver")] {
            assert!(
                Path::new(path).exists(),
                "{path} is missing: the browser test needs Debian's `chromium` and \
                 `chromium-driver` packages (apt-get install -y chromium chromium-driver \
                 fonts-liberation; .ci/run installs them). Missing package: {package}"
            );
        }
        let port = {
            let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            listener.local_addr().unwrap().port()
        };
        let driver = Command::new(CHROMEDRIVER)
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("could not start {CHROMEDRIVER}: {e}"));
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let mut browser = Browser {
            driver,
            runtime,
            client: None,
        };
        let addr: SocketAddr = ([127, 0, 0, 1], port).into();
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if TcpStream::connect(addr).is_ok() {
                let status = get(addr, "/status");
                if status.status == 200 && status.json()["value"]["ready"] == json!(true) {
                    break;
                }
            }
            assert!(
                Instant::now() < deadline,
                "chromedriver did not become ready on {addr}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        let capabilities = json!({
            "browserName": "chrome",
            "goog:chromeOptions": {
                "binary": CHROMIUM,
                "args": ["--headless=new", "--no-sandbox", "--disable-dev-shm-usage",
                         "--disable-gpu", "--window-size=1366,768", "--lang=en-GB",
                         "--no-first-run", "--disable-extensions"]
            }
        });
        let Value::Object(capabilities) = capabilities else {
            unreachable!()
        };
        let connector = hyper_util::client::legacy::connect::HttpConnector::new();
        let client = browser
            .runtime
            .block_on(
                fantoccini::ClientBuilder::new(connector)
                    .capabilities(capabilities)
                    .connect(&format!("http://{addr}")),
            )
            .unwrap_or_else(|e| panic!("WebDriver new session failed: {e}"));
        browser.client = Some(client);
        browser
    }

    fn client(&self) -> &fantoccini::Client {
        self.client.as_ref().expect("a session")
    }

    pub fn goto(&self, url: &str) {
        self.runtime
            .block_on(self.client().goto(url))
            .unwrap_or_else(|e| panic!("WebDriver goto {url} failed: {e}"));
    }

    pub fn url(&self) -> String {
        self.runtime
            .block_on(self.client().current_url())
            .unwrap_or_else(|e| panic!("WebDriver current url failed: {e}"))
            .to_string()
    }

    /// Runs `script` (a function body; `arguments` holds `args`, a JSON array) and returns its
    /// result.
    pub fn execute(&self, script: &str, args: Value) -> Value {
        let args = match args {
            Value::Array(args) => args,
            other => vec![other],
        };
        self.runtime
            .block_on(self.client().execute(script, args))
            .unwrap_or_else(|e| panic!("WebDriver execute failed: {e}"))
    }

    /// Finds an element by CSS selector and types `text` into it (WebDriver key codes allowed:
    /// `\u{E007}` is Enter).
    pub fn type_into(&self, selector: &str, text: &str) {
        self.runtime
            .block_on(async {
                let element = self
                    .client()
                    .find(fantoccini::Locator::Css(selector))
                    .await?;
                element.send_keys(text).await
            })
            .unwrap_or_else(|e| panic!("typing into {selector} failed: {e}"));
    }

    /// Repeats `script` until it returns something other than `null`/`false`, or panics with
    /// `what` after `timeout`.
    pub fn wait_for(&self, what: &str, timeout: Duration, script: &str, args: Value) -> Value {
        let deadline = Instant::now() + timeout;
        loop {
            let value = self.execute(script, args.clone());
            if !value.is_null() && value != json!(false) {
                return value;
            }
            assert!(
                Instant::now() < deadline,
                "timed out after {timeout:?} waiting for {what}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Saves a PNG screenshot of the viewport to `path` and returns the path.
    pub fn screenshot(&self, path: &Path) -> PathBuf {
        let png = self
            .runtime
            .block_on(self.client().screenshot())
            .unwrap_or_else(|e| panic!("WebDriver screenshot failed: {e}"));
        assert!(png.starts_with(b"\x89PNG"), "the screenshot is a PNG");
        std::fs::write(path, png).unwrap_or_else(|e| panic!("writing {}: {e}", path.display()));
        path.to_path_buf()
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        if let Some(client) = self.client.take() {
            // Ends the session (and its browser); the driver goes next.
            let _ = self.runtime.block_on(client.close());
        }
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}

/// `target/test-output/<name>/`, created.
pub fn output_dir(name: &str) -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target"));
    let dir = target.join("test-output").join(name);
    std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("creating {}: {e}", dir.display()));
    dir.canonicalize().unwrap_or(dir)
}
