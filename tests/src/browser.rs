//! A headless chromium driven through chromedriver (Debian's `chromium` and
//! `chromium-driver`), for the console's browser test.

use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A chromedriver process on a free port, killed on drop.
pub struct ChromeDriver {
    child: Child,
    port: u16,
}

impl ChromeDriver {
    /// Starts chromedriver and waits (with a deadline) until it answers. Panics with how
    /// to install it if it is missing: a browser test is never skipped silently.
    pub async fn start() -> ChromeDriver {
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let child =
            Command::new(std::env::var("CHROMEDRIVER").unwrap_or_else(|_| "chromedriver".into()))
                .arg(format!("--port={port}"))
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap_or_else(|e| {
                    panic!(
                        "cannot start chromedriver ({e}): install it with \
                     `apt-get install -y chromium chromium-driver` (Debian), or set \
                     CHROMEDRIVER to its path; OUTBOX_SKIP_BROWSER=1 skips this test on purpose"
                    )
                });
        let driver = ChromeDriver { child, port };
        let deadline = Instant::now() + Duration::from_secs(30);
        while tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_err()
        {
            assert!(
                Instant::now() < deadline,
                "chromedriver did not listen within 30 s"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        driver
    }

    /// A new headless browser session.
    pub async fn session(&self) -> fantoccini::Client {
        let mut caps = serde_json::Map::new();
        caps.insert(
            "goog:chromeOptions".into(),
            serde_json::json!({
                "args": ["--headless=new", "--no-sandbox", "--disable-gpu",
                         "--disable-dev-shm-usage", "--window-size=1500,900"]
            }),
        );
        fantoccini::ClientBuilder::rustls()
            .expect("TLS roots")
            .capabilities(caps)
            .connect(&format!("http://127.0.0.1:{}", self.port))
            .await
            .expect("a chromium session through chromedriver (is `chromium` installed?)")
    }
}

impl Drop for ChromeDriver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Whether the browser test was skipped on purpose (`OUTBOX_SKIP_BROWSER=1`).
pub fn skipped() -> bool {
    std::env::var("OUTBOX_SKIP_BROWSER").is_ok_and(|v| v == "1")
}
