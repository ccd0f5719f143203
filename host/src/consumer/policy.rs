//! What becomes of a message once its processor is done: the one place that turns an
//! answer or a failure into a settlement.

use std::time::Duration;

use crate::config::ProcessorConfig;
use crate::message::Status;
use crate::runtime::processor::{Outcome, Processed};
use crate::transport::Settlement;

/// The settlement for a processed message on its `attempt` (1-based).
pub fn settle(config: &ProcessorConfig, attempt: u32, processed: Processed) -> Settlement {
    let failure = match processed.outcome {
        Outcome::Answered(Status::Ack) => {
            return Settlement::Ack {
                sends: processed.sends,
            };
        }
        Outcome::Answered(Status::Reject) if config.dead_letter => {
            return Settlement::DeadLetter {
                error: "rejected by the processor".into(),
            };
        }
        Outcome::Answered(Status::Reject) => return Settlement::Drop,
        Outcome::Answered(Status::Requeue) => "requeued by the processor".to_string(),
        Outcome::Failed(failure) => failure.to_string(),
    };
    if attempt >= config.max_attempts {
        Settlement::DeadLetter {
            error: format!(
                "{failure} (attempt {attempt} of max_attempts {})",
                config.max_attempts
            ),
        }
    } else {
        Settlement::Retry {
            delay: backoff(config, attempt),
            error: failure,
        }
    }
}

/// `retry_backoff × 2^(attempt-1)`, capped at `retry_backoff_max`.
pub fn backoff(config: &ProcessorConfig, attempt: u32) -> Duration {
    let factor = 2u32.saturating_pow(attempt.saturating_sub(1).min(31));
    config
        .retry_backoff
        .checked_mul(factor)
        .unwrap_or(config.retry_backoff_max)
        .min(config.retry_backoff_max)
}

/// A message claimed more often than `max_attempts` without ever settling killed its
/// consumers (or they were killed while on it): dead-letter it without another try.
pub fn exhausted_by_crashes(config: &ProcessorConfig, attempt: u32) -> Option<Settlement> {
    (attempt > config.max_attempts).then(|| Settlement::DeadLetter {
        error: format!(
            "claimed {attempt} times without settling (its consumers died) and max_attempts is {}",
            config.max_attempts
        ),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use crate::runtime::processor::Failure;

    fn config(extra: &str) -> ProcessorConfig {
        let text = format!(
            "[[processor]]\nname = \"p\"\nplugin = \"p.wasm\"\nmax_attempts = 3\nretry_backoff = \"1s\"\nretry_backoff_max = \"3s\"\n{extra}"
        );
        Config::parse(&text, "wasmq.toml".as_ref(), ".".as_ref())
            .unwrap()
            .processors
            .remove(0)
    }

    fn processed(outcome: Outcome) -> Processed {
        Processed {
            outcome,
            sends: Vec::new(),
        }
    }

    #[test]
    fn requeue_backs_off_then_dead_letters_at_max_attempts() {
        let c = config("");
        let requeue = || processed(Outcome::Answered(Status::Requeue));
        assert_eq!(
            settle(&c, 1, requeue()),
            Settlement::Retry {
                delay: Duration::from_secs(1),
                error: "requeued by the processor".into()
            }
        );
        assert_eq!(
            settle(&c, 2, requeue()),
            Settlement::Retry {
                delay: Duration::from_secs(2),
                error: "requeued by the processor".into()
            }
        );
        assert!(
            matches!(settle(&c, 3, requeue()), Settlement::DeadLetter { error } if error.contains("attempt 3 of max_attempts 3"))
        );
        assert_eq!(
            backoff(&c, 10),
            Duration::from_secs(3),
            "capped at retry_backoff_max"
        );
    }

    #[test]
    fn failures_retry_like_requeue_and_name_their_cause() {
        let c = config("");
        let trap = processed(Outcome::Failed(Failure::Trap("unreachable".into())));
        assert!(
            matches!(settle(&c, 3, trap), Settlement::DeadLetter { error } if error.starts_with("trap: unreachable"))
        );
    }

    #[test]
    fn reject_dead_letters_or_drops() {
        assert!(matches!(
            settle(&config(""), 1, processed(Outcome::Answered(Status::Reject))),
            Settlement::DeadLetter { .. }
        ));
        assert_eq!(
            settle(
                &config("dead_letter = false"),
                1,
                processed(Outcome::Answered(Status::Reject))
            ),
            Settlement::Drop
        );
    }

    #[test]
    fn crash_loops_are_dead_lettered() {
        let c = config("");
        assert!(exhausted_by_crashes(&c, 3).is_none());
        assert!(exhausted_by_crashes(&c, 4).is_some());
    }
}
