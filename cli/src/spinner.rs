//! The progress line on a terminal while a fan-out runs: how many machines were asked, how many
//! are done (a fan-out streams its outcomes in), and for how long.

use std::io::IsTerminal;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// A spinner line on stderr while a fan-out runs, only when stderr is a terminal; cleared when
/// dropped.
pub struct Spinner {
    task: Option<tokio::task::JoinHandle<()>>,
    /// Machines whose outcome is known, as a fan-out streams them in.
    answered: Arc<AtomicUsize>,
}

impl Spinner {
    pub fn start(machines: usize) -> Spinner {
        let answered = Arc::new(AtomicUsize::new(0));
        if !std::io::stderr().is_terminal() {
            return Spinner {
                task: None,
                answered,
            };
        }
        let count = answered.clone();
        let task = tokio::spawn(async move {
            let frames = ['⠋', '⠙', '⠹', '⠸', '⠼', '⠴', '⠦', '⠧', '⠇', '⠏'];
            let started = std::time::Instant::now();
            // Quick answers should not flash a spinner.
            tokio::time::sleep(Duration::from_millis(150)).await;
            for i in 0.. {
                eprint!(
                    "\r\x1b[2K{} asking {machines} machine(s)… {} done, {:.1}s",
                    frames[i % frames.len()],
                    count.load(Ordering::Relaxed).min(machines),
                    started.elapsed().as_secs_f64()
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        });
        Spinner {
            task: Some(task),
            answered,
        }
    }

    /// One more machine's outcome is known.
    pub fn answered(&self) {
        self.answered.fetch_add(1, Ordering::Relaxed);
    }
}

impl Drop for Spinner {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
            eprint!("\r\x1b[2K");
        }
    }
}
