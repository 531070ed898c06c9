//! This process's `tracing` output, captured for tests that assert a log line (one
//! global subscriber per test binary; nextest runs each test in a process of its own).

use std::io::Write;
use std::sync::{Arc, Mutex, OnceLock};

type Buffer = Arc<Mutex<Vec<u8>>>;

static BUFFER: OnceLock<Buffer> = OnceLock::new();

/// The lines logged since [`Logs::capture`].
pub struct Logs {
    buffer: Buffer,
    from: usize,
}

struct Sink(Buffer);

impl Write for Sink {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .extend_from_slice(bytes);
        Ok(bytes.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Logs {
    /// Installs the capturing subscriber (once per process; INFO and above, no colours)
    /// and starts a capture here.
    pub fn capture() -> Logs {
        let buffer = BUFFER
            .get_or_init(|| {
                let buffer = Buffer::default();
                let sink = buffer.clone();
                let subscriber = tracing_subscriber::fmt()
                    .with_ansi(false)
                    .with_max_level(tracing::Level::INFO)
                    .with_writer(move || Sink(sink.clone()))
                    .finish();
                tracing::subscriber::set_global_default(subscriber)
                    .expect("another global tracing subscriber is installed");
                buffer
            })
            .clone();
        let from = buffer.lock().unwrap_or_else(|p| p.into_inner()).len();
        Logs { buffer, from }
    }

    /// Everything logged since the capture began.
    pub fn text(&self) -> String {
        let all = self.buffer.lock().unwrap_or_else(|p| p.into_inner());
        String::from_utf8_lossy(&all[self.from.min(all.len())..]).into_owned()
    }

    /// The captured lines that contain `needle`.
    pub fn lines_with(&self, needle: &str) -> Vec<String> {
        self.text()
            .lines()
            .filter(|l| l.contains(needle))
            .map(str::to_owned)
            .collect()
    }
}
