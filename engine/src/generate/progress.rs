//! Showing the generator's progress: a bar on a terminal, plain periodic lines otherwise.

use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

use super::{Observer, Progress, Start, Summary};

/// How often a plain progress line is logged when stderr is not a terminal.
const LINE_INTERVAL: Duration = Duration::from_secs(5);

/// A progress bar with rate, ETA and counts on a terminal (stderr); when stderr is not a
/// terminal, a log line every five seconds. The final summary is printed to stdout.
#[derive(Debug)]
pub struct TerminalProgress {
    bar: ProgressBar,
    last_line: Instant,
    quiet: bool,
}

impl Default for TerminalProgress {
    fn default() -> Self {
        Self::new()
    }
}

impl TerminalProgress {
    /// Draws on stderr if it is a terminal.
    pub fn new() -> Self {
        let bar = ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr());
        TerminalProgress {
            bar,
            last_line: Instant::now(),
            quiet: false,
        }
    }

    /// No bar, no lines, no summary (for embedding programs that report themselves).
    pub fn quiet() -> Self {
        TerminalProgress {
            bar: ProgressBar::hidden(),
            last_line: Instant::now(),
            quiet: true,
        }
    }

    fn interactive(&self) -> bool {
        !self.quiet && !self.bar.is_hidden()
    }
}

/// Per-kind counts in a compact form for the bar's message.
fn counts_message(progress: &Progress<'_>) -> String {
    let k = progress.kinds;
    format!(
        "{} corr · {} del · {} dup · {} refund · {} late · {} bad",
        k.correction,
        k.delete,
        k.duplicate,
        k.refund,
        k.late,
        k.malformed_total()
    )
}

impl Observer for TerminalProgress {
    fn started(&mut self, start: &Start) {
        if start.resumed_from > 0 || start.replayed > 0 {
            tracing::info!(
                database = %start.database,
                resumed_from = start.resumed_from,
                replayed = start.replayed,
                "Resuming an earlier run of the same settings."
            );
        }
        if !self.interactive() {
            return;
        }
        let template = match start.target {
            Some(target) => {
                self.bar.set_length(target);
                "{spinner} [{elapsed_precise}] {wide_bar} {human_pos}/{human_len} · {per_sec:0} · ETA {eta}\n  {msg}"
            }
            None => "{spinner} [{elapsed_precise}] {human_pos} records · {per_sec:0}\n  {msg}",
        };
        self.bar.set_style(
            ProgressStyle::with_template(template)
                .unwrap_or_else(|_| ProgressStyle::default_bar())
                .progress_chars("=> "),
        );
        self.bar.set_position(start.resumed_from);
        self.bar.reset_eta();
        self.bar.enable_steady_tick(Duration::from_millis(200));
    }

    fn progress(&mut self, progress: &Progress<'_>) {
        if self.quiet {
            return;
        }
        if self.interactive() {
            self.bar.set_position(progress.records);
            self.bar.set_message(counts_message(progress));
            return;
        }
        if self.last_line.elapsed() < LINE_INTERVAL {
            return;
        }
        self.last_line = Instant::now();
        let rate = progress.session_records as f64 / progress.elapsed.as_secs_f64().max(1e-9);
        let (of, share) = match progress.target {
            Some(target) => {
                let left = target.saturating_sub(progress.records);
                (
                    format!("/{target}"),
                    format!(
                        " ({:.1} %, ETA {:.0} s)",
                        100.0 * progress.records as f64 / target.max(1) as f64,
                        left as f64 / rate.max(1e-9)
                    ),
                )
            }
            None => (String::new(), String::new()),
        };
        tracing::info!(
            "generated {}{of} records{share}, {rate:.0} records/s; {}",
            progress.records,
            counts_message(progress)
        );
    }

    fn finished(&mut self, summary: &Summary) {
        self.bar.finish_and_clear();
        if !self.quiet {
            println!("{summary}");
        }
    }
}
