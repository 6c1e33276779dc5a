//! The control connection between the two lab hosts: one TCP connection
//! over the lab network, carrying JSON lines and, after a `{"file":...}`
//! line, raw file bytes. A leads, B follows.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::Value;

/// Default port of the control connection on the lab network.
pub const PORT: u16 = 7700;

/// Largest file accepted over the connection.
pub const MAX_FILE_BYTES: u64 = 256 << 20;

/// One end of the connection.
pub struct Control {
    reader: BufReader<TcpStream>,
    writer: TcpStream,
}

impl Control {
    fn new(stream: TcpStream) -> io::Result<Control> {
        stream.set_nodelay(true)?;
        let writer = stream.try_clone()?;
        Ok(Control {
            reader: BufReader::new(stream),
            writer,
        })
    }

    /// Listens on `addr` and accepts one peer.
    pub fn accept(addr: SocketAddr) -> io::Result<Control> {
        let listener = TcpListener::bind(addr)?;
        let (stream, _) = listener.accept()?;
        Control::new(stream)
    }

    /// Connects to `addr`, retrying until `timeout` (the peer may still boot).
    pub fn connect(addr: SocketAddr, timeout: Duration) -> io::Result<Control> {
        let until = Instant::now() + timeout;
        loop {
            match TcpStream::connect_timeout(&addr, Duration::from_secs(2)) {
                Ok(s) => return Control::new(s),
                Err(e) if Instant::now() > until => return Err(e),
                Err(_) => std::thread::sleep(Duration::from_millis(200)),
            }
        }
    }

    /// Sends one JSON message.
    pub fn send(&mut self, msg: &Value) -> io::Result<()> {
        let mut line = serde_json::to_vec(msg).map_err(io::Error::other)?;
        line.push(b'\n');
        self.writer.write_all(&line)
    }

    /// Receives one JSON message.
    pub fn recv(&mut self) -> io::Result<Value> {
        let mut line = String::new();
        let n = self.reader.read_line(&mut line)?;
        if n == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        serde_json::from_str(&line)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, format!("{e}: {line:?}")))
    }

    /// Receives a message and checks its `step` is `want`; a message
    /// `{"error": ...}` from the peer becomes an error.
    pub fn expect(&mut self, want: &str) -> io::Result<Value> {
        let msg = self.recv()?;
        if let Some(e) = msg.get("error").and_then(Value::as_str) {
            return Err(io::Error::other(format!("the peer failed: {e}")));
        }
        match msg.get("step").and_then(Value::as_str) {
            Some(s) if s == want => Ok(msg),
            _ => Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("expected step {want:?}, got {msg}"),
            )),
        }
    }

    /// Sends a file's bytes, announced by `{"file": name, "len": n}`.
    pub fn send_file(&mut self, name: &str, path: &Path) -> io::Result<()> {
        let data = std::fs::read(path)?;
        self.send(&serde_json::json!({"file": name, "len": data.len()}))?;
        self.writer.write_all(&data)
    }

    /// Receives a file announced by [`Control::send_file`] into `path`;
    /// returns its name.
    pub fn recv_file(&mut self, path: &Path) -> io::Result<String> {
        let msg = self.recv()?;
        let name = msg.get("file").and_then(Value::as_str).map(str::to_string);
        let len = msg.get("len").and_then(Value::as_u64);
        let (Some(name), Some(len)) = (name, len) else {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("expected a file, got {msg}"),
            ));
        };
        if len > MAX_FILE_BYTES {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("file {name} of {len} bytes"),
            ));
        }
        let mut data = Vec::new();
        (&mut self.reader).take(len).read_to_end(&mut data)?;
        if u64::try_from(data.len()).unwrap_or(u64::MAX) != len {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        std::fs::write(path, &data)?;
        Ok(name)
    }
}
