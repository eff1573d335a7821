//! A task that listens on the relay for as long as its handle lives.

use tokio::task::JoinHandle;

/// A listening task; dropping the handle stops it.
pub(super) struct Listening(pub(super) JoinHandle<()>);

impl Drop for Listening {
    fn drop(&mut self) {
        self.0.abort();
    }
}
