//! The fleet dashboard in a real browser: headless Chromium (Debian's `chromium`) driven over the
//! DevTools protocol, against a gateway and three nodes making calls, some of them failing.

use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use bytes::Bytes;
use serde_json::{Value, json};
use starling_tests::{Pki, closed_tcp_port, post};
use tungstenite::{Message, WebSocket, stream::MaybeTlsStream};

const UP: Duration = Duration::from_secs(20);

/// Headless Chromium with one page, and a DevTools session on it.
struct Browser {
    child: Child,
    ws: WebSocket<MaybeTlsStream<TcpStream>>,
    next_id: u64,
    /// Every URL the page asked for (from `Network.requestWillBeSent`).
    requests: Vec<String>,
    _profile: tempfile::TempDir,
}

impl Browser {
    fn open(url: &str) -> Browser {
        let profile = tempfile::tempdir().expect("profile");
        let child = Command::new("chromium")
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--remote-debugging-port=0",
                "--window-size=1280,900",
            ])
            .arg(format!("--user-data-dir={}", profile.path().display()))
            .arg("about:blank")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("chromium (scripts/setup.sh installs it)");
        // Chromium writes the port it picked into the profile.
        let port_file = profile.path().join("DevToolsActivePort");
        let deadline = Instant::now() + UP;
        let port: u16 = loop {
            if let Some(port) = std::fs::read_to_string(&port_file)
                .ok()
                .and_then(|s| s.lines().next().and_then(|l| l.parse().ok()))
            {
                break port;
            }
            assert!(Instant::now() < deadline, "chromium never opened DevTools");
            std::thread::sleep(Duration::from_millis(50));
        };
        let list = devtools_get(port, "/json/list");
        let pages: Value = serde_json::from_str(&list).expect("json");
        let ws_url = pages
            .as_array()
            .and_then(|p| p.iter().find(|p| p["type"] == "page"))
            .and_then(|p| p["webSocketDebuggerUrl"].as_str())
            .expect("a page")
            .to_owned();
        let (ws, _) = tungstenite::connect(ws_url.as_str()).expect("DevTools WebSocket");
        if let MaybeTlsStream::Plain(s) = ws.get_ref() {
            s.set_read_timeout(Some(Duration::from_secs(10)))
                .expect("timeout");
        }
        let mut browser = Browser {
            child,
            ws,
            next_id: 0,
            requests: Vec::new(),
            _profile: profile,
        };
        browser.call("Network.enable", json!({}));
        browser.call("Page.enable", json!({}));
        browser.call("Page.navigate", json!({ "url": url }));
        browser
    }

    /// Sends a DevTools command and returns its result (events met on the way are kept).
    fn call(&mut self, method: &str, params: Value) -> Value {
        self.next_id += 1;
        let id = self.next_id;
        let msg = json!({ "id": id, "method": method, "params": params }).to_string();
        self.ws.send(Message::text(msg)).expect("send");
        loop {
            let msg = self.ws.read().expect("a DevTools message");
            let Ok(text) = msg.to_text() else { continue };
            let v: Value = serde_json::from_str(text).expect("json");
            if v["method"] == "Network.requestWillBeSent" {
                if let Some(url) = v["params"]["request"]["url"].as_str() {
                    self.requests.push(url.to_owned());
                }
                continue;
            }
            if v["id"] == id {
                assert!(v["error"].is_null(), "{method}: {v}");
                return v["result"].clone();
            }
        }
    }

    /// Evaluates `expr` in the page: its value.
    fn eval(&mut self, expr: &str) -> Value {
        let r = self.call(
            "Runtime.evaluate",
            json!({ "expression": expr, "returnByValue": true }),
        );
        r["result"]["value"].clone()
    }

    /// Waits until `expr` is true in the page (polled; the page updates itself).
    fn wait_for(&mut self, what: &str, expr: &str) {
        let deadline = Instant::now() + UP;
        loop {
            if self.eval(expr) == Value::Bool(true) {
                return;
            }
            if Instant::now() >= deadline {
                let text = self.eval("document.body.innerText");
                panic!("the dashboard never showed {what}:\n{text}");
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    fn screenshot(&mut self, path: &Path) {
        let shot = self.call("Page.captureScreenshot", json!({ "format": "png" }));
        let data = shot["data"].as_str().expect("png");
        std::fs::write(path, base64_decode(data)).expect("write the screenshot");
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `GET path` from Chromium's DevTools HTTP endpoint (it keeps the connection open: the body is
/// read by its length).
fn devtools_get(port: u16, path: &str) -> String {
    use std::io::{BufRead, Read, Write};
    let mut stream =
        TcpStream::connect(SocketAddr::from(([127, 0, 0, 1], port))).expect("DevTools");
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n"
    )
    .expect("write");
    let mut reader = std::io::BufReader::new(stream);
    let mut length = 0usize;
    loop {
        let mut line = String::new();
        reader.read_line(&mut line).expect("a header line");
        let line = line.trim_end();
        if line.is_empty() {
            break;
        }
        if let Some(v) = line
            .to_ascii_lowercase()
            .strip_prefix("content-length:")
            .map(|v| v.trim().to_owned())
        {
            length = v.parse().expect("a length");
        }
    }
    let mut body = vec![0u8; length];
    reader.read_exact(&mut body).expect("the body");
    String::from_utf8(body).expect("utf-8")
}

fn base64_decode(s: &str) -> Vec<u8> {
    let value = |c: u8| -> u32 {
        match c {
            b'A'..=b'Z' => u32::from(c - b'A'),
            b'a'..=b'z' => u32::from(c - b'a') + 26,
            b'0'..=b'9' => u32::from(c - b'0') + 52,
            b'+' => 62,
            _ => 63,
        }
    };
    let bytes: Vec<u8> = s.bytes().filter(|c| *c != b'=').collect();
    let mut out = Vec::with_capacity(bytes.len() * 3 / 4);
    for chunk in bytes.chunks(4) {
        let mut n = 0u32;
        for (i, c) in chunk.iter().enumerate() {
            n |= value(*c) << (18 - 6 * i);
        }
        let keep = chunk.len().saturating_sub(1);
        out.extend_from_slice(&n.to_be_bytes()[1..1 + keep]);
    }
    out
}

/// Where test artefacts go: `target/test-artifacts`.
fn artifacts() -> PathBuf {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/test-artifacts");
    std::fs::create_dir_all(&dir).expect("artefacts folder");
    dir
}

/// A gateway and three nodes: node-c calls `echo` on node-a (it answers) and `broken` on node-b
/// (its upstream refuses). The dashboard shows the three nodes, the edges with their counts, the
/// failing service's error share; node-b killed turns down on the page without a reload; the page
/// asks for nothing outside the gateway; on a phone-wide screen nothing is wider than the screen;
/// screenshots (desktop and phone) are kept as test artefacts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_shows_the_fleet_live_in_a_real_browser() {
    let pki = Pki::new();
    let (gw, admin) = starling_tests::quick_gateway(&pki, "");
    let node = |name: &str, extra: &str| starling_tests::gateway_node(&pki, &gw, name, extra);
    let a = node(
        "node-a",
        "[[services]]\nname = \"echo\"\nupstream = \"builtin:echo\"\n",
    );
    let b = node(
        "node-b",
        &format!(
            "[[services]]\nname = \"broken\"\nupstream = \"http://127.0.0.1:{}\"\n",
            closed_tcp_port()
        ),
    );
    let c = node(
        "node-c",
        &format!(
            "[[peers]]\naddr = \"{}\"\n[[peers]]\naddr = \"{}\"\n",
            a.quic, b.quic
        ),
    );
    c.wait_peer("node-a", UP);
    c.wait_peer("node-b", UP);
    for _ in 0..7 {
        let (code, _, _) = post(c.ingress(), "echo", "say", Bytes::from_static(b"hi"), None)
            .await
            .expect("call");
        assert_eq!(code, 200);
    }
    for _ in 0..3 {
        let (code, _, _) = post(c.ingress(), "broken", "get", Bytes::new(), None)
            .await
            .expect("call");
        assert_eq!(code, 503);
    }

    let origin = format!("http://{admin}");
    let mut browser = Browser::open(&format!("{origin}/"));
    browser.wait_for(
        "three nodes up",
        "[...document.querySelectorAll('#nodes tbody tr')].filter(r => r.querySelector('.state-up')).length === 3",
    );
    browser.wait_for(
        "the edge node-c to node-a with its 7 calls",
        "(() => { const r = document.querySelector('#edges tr[data-edge=\"node-c>node-a\"]'); \
         return !!r && r.querySelector('.count').textContent === '7'; })()",
    );
    browser.wait_for(
        "the edge in the topology drawing",
        "!!document.querySelector('#topology g.edge[data-edge=\"node-c>node-b\"]')",
    );
    browser.wait_for(
        "the failing service's error share (3 of 3)",
        "(() => { const r = document.querySelector('#services tr[data-service=\"broken\"]'); \
         return !!r && r.querySelector('.errors').textContent === '100.0%' \
         && r.querySelector('.count').textContent === '3'; })()",
    );
    let echo_errors = browser
        .eval("document.querySelector('#services tr[data-service=\"echo\"] .errors').textContent");
    assert_eq!(echo_errors, "0.0%");

    // node-b dies: the page says so on its next poll, without a reload.
    let reloads_before = browser.eval("performance.getEntriesByType('navigation').length");
    drop(b);
    browser.wait_for(
        "node-b down",
        "(() => { const r = document.querySelector('#nodes tr[data-node=\"node-b\"]'); \
         return !!r && r.querySelector('.state-down') !== null; })()",
    );
    assert_eq!(
        browser.eval("performance.getEntriesByType('navigation').length"),
        reloads_before
    );
    browser.wait_for(
        "the summary counting node-b down",
        "document.getElementById('summary').textContent.startsWith('2 of 3 nodes up')",
    );
    browser.screenshot(&artifacts().join("dashboard.png"));

    // On a phone in the plant (360 CSS pixels wide, touch): one column, nothing wider than the
    // screen (wide tables scroll inside their own box), the nodes still readable.
    browser.call(
        "Emulation.setDeviceMetricsOverride",
        json!({ "width": 360, "height": 780, "deviceScaleFactor": 2, "mobile": true }),
    );
    browser.wait_for(
        "a page no wider than a phone's screen",
        "window.innerWidth === 360 && document.documentElement.scrollWidth <= 360 \
         && [...document.querySelectorAll('main > section')].every(s => s.getBoundingClientRect().right <= 360)",
    );
    browser.wait_for(
        "the nodes on a phone",
        "document.querySelectorAll('#nodes tbody tr').length === 3 \
         && document.querySelector('#nodes').getBoundingClientRect().width > 0",
    );
    browser.screenshot(&artifacts().join("dashboard-phone.png"));

    // Nothing but the gateway.
    let elsewhere: Vec<&String> = browser
        .requests
        .iter()
        .filter(|u| !u.starts_with(&origin))
        .collect();
    assert!(
        elsewhere.is_empty(),
        "requests outside the gateway: {elsewhere:?}"
    );
    assert!(
        browser.requests.iter().any(|u| u.ends_with("/v1/overview")),
        "{:?}",
        browser.requests
    );
    drop((a, c, gw));
}
