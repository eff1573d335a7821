//! Reloading what the server reads from files, without a restart: on SIGHUP (`bus
//! server`) and `POST /admin/reload`.
//!
//! A [`Reloader`] is a list of [`ReloadStep`]s, each re-reading one thing (the
//! credentials, the TLS certificate) and reporting what it did or why it failed. A
//! step that fails keeps what it had: a bad file never leaves the server without
//! credentials or a certificate. Steps run one after the other, on a blocking thread (they
//! read files), and one reload at a time.

use std::sync::Arc;

/// One thing that can be reloaded.
pub trait ReloadStep: Send + Sync {
    /// What it reloads, in a word or two (`credentials`): the report's and the log's name.
    fn name(&self) -> &'static str;

    /// Re-reads it (blocking I/O is fine). `Ok`: what is in force now, in a few words;
    /// `Err`: why nothing changed, naming the file and the problem.
    fn reload(&self) -> Result<String, String>;
}

/// What one step of a reload did.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct StepReport {
    /// The step's [`ReloadStep::name`].
    pub name: &'static str,
    /// Whether it took the new files.
    pub ok: bool,
    /// What is in force now, or why the old stays.
    pub message: String,
}

/// What a reload did, step by step.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct ReloadReport {
    /// One per step, in the order they ran.
    pub steps: Vec<StepReport>,
}

impl ReloadReport {
    /// Whether every step succeeded (true when there is nothing to reload).
    pub fn ok(&self) -> bool {
        self.steps.iter().all(|step| step.ok)
    }
}

/// The server's reload steps.
#[derive(Default)]
pub struct Reloader {
    steps: Vec<Arc<dyn ReloadStep>>,
    /// One reload at a time: two at once could finish in either order.
    running: tokio::sync::Mutex<()>,
}

impl Reloader {
    /// A reloader with nothing to reload yet.
    pub fn new() -> Reloader {
        Reloader::default()
    }

    /// Adds a step; steps run in the order they were added.
    pub fn add(&mut self, step: Arc<dyn ReloadStep>) {
        self.steps.push(step);
    }

    /// Runs every step, logging each outcome (`why`: what asked for the reload, for the
    /// log), and reports them.
    pub async fn reload(&self, why: &str) -> ReloadReport {
        let _one_at_a_time = self.running.lock().await;
        let steps = self.steps.clone();
        let run = move || {
            steps
                .iter()
                .map(|step| match step.reload() {
                    Ok(message) => StepReport {
                        name: step.name(),
                        ok: true,
                        message,
                    },
                    Err(message) => StepReport {
                        name: step.name(),
                        ok: false,
                        message,
                    },
                })
                .collect()
        };
        let steps = match tokio::task::spawn_blocking(run).await {
            Ok(steps) => steps,
            Err(e) => vec![StepReport {
                name: "reload",
                ok: false,
                message: format!("the reload task failed: {e}"),
            }],
        };
        for step in &steps {
            if step.ok {
                tracing::info!(reload = step.name, by = why, "reloaded: {}", step.message);
            } else {
                tracing::error!(
                    reload = step.name,
                    by = why,
                    "reload failed, keeping the previous one: {}",
                    step.message
                );
            }
        }
        ReloadReport { steps }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering};

    struct Flaky(AtomicBool);

    impl ReloadStep for Flaky {
        fn name(&self) -> &'static str {
            "flaky"
        }
        fn reload(&self) -> Result<String, String> {
            if self.0.swap(false, Ordering::Relaxed) {
                Err("file x: line 1: nonsense".into())
            } else {
                Ok("fine".into())
            }
        }
    }

    #[tokio::test]
    async fn every_step_reports() {
        assert!(Reloader::new().reload("test").await.ok());
        let mut reloader = Reloader::new();
        reloader.add(Arc::new(Flaky(AtomicBool::new(true))));
        reloader.add(Arc::new(Flaky(AtomicBool::new(false))));
        let report = reloader.reload("test").await;
        assert!(!report.ok());
        assert_eq!(report.steps.len(), 2);
        assert!(!report.steps[0].ok && report.steps[0].message.contains("line 1"));
        assert!(report.steps[1].ok);
        assert!(reloader.reload("test").await.ok());
    }
}
