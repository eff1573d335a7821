//! Helpers for tests that run the `bus` client commands as real processes.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Write};
use std::process::{Child, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use super::process::bus;

/// What a finished command did.
#[derive(Debug)]
pub struct Run {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl Run {
    /// Asserts success and returns standard output.
    pub fn ok(&self) -> &str {
        assert_eq!(self.code, 0, "command failed: {self:?}");
        &self.stdout
    }

    pub fn lines(&self) -> Vec<&str> {
        self.stdout.lines().collect()
    }
}

/// Runs `bus <args>` with `stdin` as its input; kills it and panics after a minute.
pub fn run(args: &[&str], stdin: Option<&str>) -> Run {
    run_with_env(args, stdin, &[])
}

pub fn run_with_env(args: &[&str], stdin: Option<&str>, env: &[(&str, &str)]) -> Run {
    let mut command = bus();
    command
        .args(args)
        .envs(env.iter().copied())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = command.spawn().expect("spawn bus");
    let mut input = child.stdin.take().expect("stdin");
    let text = stdin.unwrap_or_default().to_owned();
    std::thread::spawn(move || {
        let _ = input.write_all(text.as_bytes());
    });
    let pid = child.id();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(Duration::from_secs(60)) {
        Ok(output) => {
            let output = output.expect("wait for bus");
            Run {
                code: output.status.code().unwrap_or(-1),
                stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
                stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
            }
        }
        Err(_) => {
            // SAFETY: kill only sends a signal to the process we spawned.
            unsafe {
                libc::kill(pid as i32, libc::SIGKILL);
            }
            panic!("bus {args:?} did not finish within a minute");
        }
    }
}

/// A client command left running (a `bus get`), read line by line.
pub struct Background {
    pub child: Child,
    pub stdout: mpsc::Receiver<String>,
    pub stderr: mpsc::Receiver<String>,
    /// Standard error lines read so far.
    pub errors: Vec<String>,
}

impl Background {
    pub fn start(args: &[&str]) -> Background {
        Background::start_with_env(args, &[])
    }

    pub fn start_with_env(args: &[&str], env: &[(&str, &str)]) -> Background {
        let mut child = bus()
            .args(args)
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn bus");
        let stdout = lines_of(child.stdout.take().expect("stdout"));
        let stderr = lines_of(child.stderr.take().expect("stderr"));
        Background {
            child,
            stdout,
            stderr,
            errors: Vec::new(),
        }
    }

    /// Waits until standard error has a line containing `text`.
    pub fn wait_for_stderr(&mut self, text: &str) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while !self.errors.iter().any(|line| line.contains(text)) {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.stderr.recv_timeout(left) {
                Ok(line) => self.errors.push(line),
                Err(_) => panic!("no {text:?} on stderr; got {:?}", self.errors),
            }
        }
    }

    /// The next `n` lines of standard output.
    pub fn take_lines(&mut self, n: usize) -> Vec<String> {
        (0..n)
            .map(|i| {
                self.stdout
                    .recv_timeout(Duration::from_secs(30))
                    .unwrap_or_else(|_| panic!("line {i} of {n} did not come"))
            })
            .collect()
    }

    /// Waits for the command to exit and returns its code.
    pub fn wait(&mut self) -> i32 {
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                self.errors.extend(self.stderr.try_iter());
                return status.code().unwrap_or(-1);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("bus did not exit; stderr: {:?}", self.errors);
    }
}

impl Drop for Background {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

fn lines_of(reader: impl std::io::Read + Send + 'static) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(reader).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    rx
}

/// A local port that is free right now (for a server that must restart on the same
/// address).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .expect("bind a free port")
        .port()
}
