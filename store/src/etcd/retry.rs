//! When a failed etcd call may be tried again: the classification of etcd-client failures and
//! the bounded retry loop with backoff that every [`EtcdStore`](super::EtcdStore) call runs in.
//!
//! etcd-client does not retry, and with one member of three down about a quarter of calls fail
//! (the balanced channel keeps picking the dead member). Whether a failed call may be sent
//! again depends on whether the failed attempt can have been applied:
//!
//! - [`Failure::NotSent`]: the request never reached an etcd member that could apply it (the
//!   connection could not be made; the member had no leader, dropped the proposal, or refused
//!   it as overloaded).
//!   Any call may be sent again, conditional writes included.
//! - [`Failure::Unknown`]: the request may have been applied (a timeout, a connection lost
//!   mid-call, etcd's own "request timed out" or "leader changed"). Only calls that are safe to
//!   apply twice ([`Safety::Idempotent`]) are sent again; the others fail with
//!   [`CallError::OutcomeUnknown`] so the caller reads the state again instead of guessing.
//! - [`Failure::Refused`]: etcd answered, with an error that another attempt would repeat.
//!
//! Retries stop at the policy's deadline ([`CallError::Unavailable`]).

use std::fmt;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::time::Instant;
use tonic::Code;

/// How the store retries a call that failed transiently.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RetryPolicy {
    /// The longest one attempt may take before it is abandoned (and counted as
    /// an unknown outcome: it may still be applied). Longer than etcd's own request timeout
    /// (7 s with default election settings) would only delay failover.
    pub attempt_timeout: Duration,
    /// No attempt starts after this long since the first one.
    pub deadline: Duration,
    /// The pause before the first retry; it doubles with each retry up to `max_backoff`, and a
    /// random part of it (up to a half) is added so that many callers do not retry in step.
    pub first_backoff: Duration,
    pub max_backoff: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            attempt_timeout: Duration::from_secs(3),
            deadline: Duration::from_secs(10),
            first_backoff: Duration::from_millis(25),
            max_backoff: Duration::from_millis(500),
        }
    }
}

impl RetryPolicy {
    /// The pause after `retries` failed attempts (1 for the first retry), before jitter.
    pub(crate) fn backoff(&self, retries: u32) -> Duration {
        let factor = 1u32
            .checked_shl(retries.saturating_sub(1))
            .unwrap_or(u32::MAX);
        self.first_backoff
            .saturating_mul(factor)
            .min(self.max_backoff)
    }
}

/// Whether a call may be applied twice.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Safety {
    /// Reads, unconditional puts (the same value again), lease renewals, grants with a
    /// client-chosen id, revocations, watch creation: retried after any transient failure.
    Idempotent,
    /// Conditional writes: a second application would answer "conflict" for a write that in
    /// fact succeeded. Retried only when the failed attempt was certainly not applied.
    Conditional,
}

/// What one failed attempt tells about the call.
#[derive(Debug)]
pub(crate) enum Failure {
    /// Certainly not applied: safe to send again whatever the call.
    NotSent(Attempt),
    /// May have been applied.
    Unknown(Attempt),
    /// etcd answered with an error; trying again would not change it.
    Refused(etcd_client::Error),
}

/// Why an attempt failed transiently.
#[derive(Debug)]
pub(crate) enum Attempt {
    Error(etcd_client::Error),
    /// The attempt took longer than [`RetryPolicy::attempt_timeout`].
    TimedOut(Duration),
}

impl fmt::Display for Attempt {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            // etcd-client shows a status with its source's `Debug`; the message and the root
            // cause say it in fewer words ("tcp connect error: Connection refused (os error
            // 111)").
            Attempt::Error(etcd_client::Error::GRpcStatus(status)) => {
                write!(f, "{}", status.message())?;
                let mut cause: Option<&(dyn std::error::Error + 'static)> =
                    std::error::Error::source(status);
                let mut root = None;
                while let Some(error) = cause {
                    root = Some(error);
                    cause = error.source();
                }
                match root {
                    Some(root) if !status.message().contains(&root.to_string()) => {
                        write!(f, ": {root}")
                    }
                    _ => Ok(()),
                }
            }
            Attempt::Error(error) => write!(f, "{error}"),
            Attempt::TimedOut(after) => write!(f, "no answer within {after:?}"),
        }
    }
}

/// A call that did not succeed.
#[derive(Debug)]
pub(crate) enum CallError {
    /// etcd refused the request (lease not found, request too large, compacted…).
    Refused(etcd_client::Error),
    /// A conditional call whose last attempt may have been applied.
    OutcomeUnknown(Attempt),
    /// Every attempt failed transiently until the deadline.
    Unavailable { attempts: u32, last: Attempt },
}

/// A successful call, and whether an earlier attempt of it may have been applied too (so that
/// an answer like "lease not found" to a revocation can be read as "already revoked").
#[derive(Debug)]
pub(crate) struct Answer<T> {
    pub value: T,
    pub after_unknown: bool,
}

/// The parts of an etcd-client failure that decide its class, so [`classify_status`] is a
/// plain function of data.
#[derive(Clone, Copy, Debug)]
pub(crate) struct StatusFacts<'a> {
    pub code: Code,
    pub message: &'a str,
    /// tonic marks failures to connect with a `ConnectError` in the source chain.
    pub connect_error: bool,
}

/// The class of a gRPC status from etcd or from the client's transport.
pub(crate) fn classify_status(facts: StatusFacts<'_>) -> Class {
    let StatusFacts {
        code,
        message,
        connect_error,
    } = facts;
    match code {
        // The connection to the member could not be made: nothing was sent.
        Code::Unavailable if connect_error => Class::NotSent,
        // With `require_leader`, a member that has no leader refuses before proposing; one
        // that lost it after that check drops the proposal ("raft proposal dropped").
        Code::Unavailable if message.contains("no leader") => Class::NotSent,
        Code::Unknown if message.contains("raft proposal dropped") => Class::NotSent,
        // "etcdserver: request timed out", "leader changed", "server stopped", a connection
        // reset mid-call, an expired HTTP/2 keep-alive: the proposal may have been made.
        Code::Unavailable
        | Code::Unknown
        | Code::Internal
        | Code::Cancelled
        | Code::DeadlineExceeded
        | Code::Aborted => Class::Unknown,
        // "etcdserver: too many requests" is refused before proposing; a message over the gRPC
        // limit is a request too large, which another attempt would not fix.
        Code::ResourceExhausted if message.contains("too many requests") => Class::NotSent,
        _ => Class::Refused,
    }
}

/// See [`classify_status`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Class {
    NotSent,
    Unknown,
    Refused,
}

/// Classifies one etcd-client failure.
pub(crate) fn classify(error: etcd_client::Error) -> Failure {
    let class = match &error {
        etcd_client::Error::GRpcStatus(status) => classify_status(StatusFacts {
            code: status.code(),
            message: status.message(),
            connect_error: has_connect_error(status),
        }),
        // Connection-level failures outside a call: whether the request went out is unknown.
        etcd_client::Error::TransportError(_) | etcd_client::Error::IoError(_) => Class::Unknown,
        // A stream (watch, keep-alive) that ended before its first answer, or whose request
        // channel closed: the connection went away.
        etcd_client::Error::WatchError(_) => Class::Unknown,
        etcd_client::Error::LeaseKeepAliveError(message) if !is_lease_not_found(message) => {
            Class::Unknown
        }
        _ => Class::Refused,
    };
    match class {
        Class::NotSent => Failure::NotSent(Attempt::Error(error)),
        Class::Unknown => Failure::Unknown(Attempt::Error(error)),
        Class::Refused => Failure::Refused(error),
    }
}

/// etcd-client's answer to a keep-alive of a lease that does not exist (TTL 0).
pub(crate) fn is_lease_not_found(message: &str) -> bool {
    message.contains("lease not found")
}

fn has_connect_error(status: &tonic::Status) -> bool {
    let mut source: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(status);
    while let Some(error) = source {
        if error.is::<tonic::ConnectError>() {
            return true;
        }
        source = error.source();
    }
    false
}

/// Runs `attempt` until it succeeds, fails for good, or the policy's deadline passes.
/// Every attempt that failed transiently and was tried again is counted in `retried`.
pub(crate) async fn run<T, F, Fut>(
    policy: &RetryPolicy,
    safety: Safety,
    retried: &AtomicU64,
    mut attempt: F,
) -> Result<Answer<T>, CallError>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, etcd_client::Error>>,
{
    let started = Instant::now();
    let mut attempts = 0u32;
    let mut after_unknown = false;
    loop {
        attempts += 1;
        let failure = match tokio::time::timeout(policy.attempt_timeout, attempt()).await {
            Ok(Ok(value)) => {
                return Ok(Answer {
                    value,
                    after_unknown,
                });
            }
            Ok(Err(error)) => classify(error),
            Err(_) => Failure::Unknown(Attempt::TimedOut(policy.attempt_timeout)),
        };
        let last = match failure {
            Failure::Refused(error) => return Err(CallError::Refused(error)),
            Failure::Unknown(last) if safety == Safety::Conditional => {
                return Err(CallError::OutcomeUnknown(last));
            }
            Failure::Unknown(last) => {
                after_unknown = true;
                last
            }
            Failure::NotSent(last) => last,
        };
        let pause = jitter(policy.backoff(attempts));
        if started.elapsed() + pause >= policy.deadline {
            return Err(CallError::Unavailable { attempts, last });
        }
        tracing::debug!(attempt = attempts, error = %last, "etcd call failed; retrying");
        retried.fetch_add(1, Ordering::Relaxed);
        tokio::time::sleep(pause).await;
    }
}

/// `pause` plus up to half of it again, at random.
fn jitter(pause: Duration) -> Duration {
    let extra = pause.mul_f64(rand::random::<f64>() / 2.0);
    pause + extra
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_are_classified_by_whether_they_can_have_been_applied() {
        let cases: &[(Code, &str, bool, Class)] = &[
            (
                Code::Unavailable,
                "tcp connect error: Connection refused (os error 111)",
                true,
                Class::NotSent,
            ),
            (
                Code::Unavailable,
                "etcdserver: no leader",
                false,
                Class::NotSent,
            ),
            (
                Code::Unavailable,
                "etcdserver: request timed out",
                false,
                Class::Unknown,
            ),
            (
                Code::Unavailable,
                "etcdserver: leader changed",
                false,
                Class::Unknown,
            ),
            (Code::Unavailable, "connection reset", false, Class::Unknown),
            (Code::Unknown, "h2 protocol error", false, Class::Unknown),
            (
                Code::Unknown,
                "raft proposal dropped",
                false,
                Class::NotSent,
            ),
            (Code::Cancelled, "Timeout expired", false, Class::Unknown),
            (
                Code::ResourceExhausted,
                "etcdserver: too many requests",
                false,
                Class::NotSent,
            ),
            (
                Code::ResourceExhausted,
                "grpc: received message larger than max (3000000 vs. 2097152)",
                false,
                Class::Refused,
            ),
            (
                Code::NotFound,
                "etcdserver: requested lease not found",
                false,
                Class::Refused,
            ),
            (
                Code::InvalidArgument,
                "etcdserver: request is too large",
                false,
                Class::Refused,
            ),
            (
                Code::OutOfRange,
                "etcdserver: mvcc: required revision has been compacted",
                false,
                Class::Refused,
            ),
            (
                Code::FailedPrecondition,
                "etcdserver: lease already exists",
                false,
                Class::Refused,
            ),
        ];
        for &(code, message, connect_error, expected) in cases {
            let facts = StatusFacts {
                code,
                message,
                connect_error,
            };
            assert_eq!(classify_status(facts), expected, "{code:?} {message:?}");
        }
    }

    #[test]
    fn client_errors_are_classified() {
        assert!(matches!(
            classify(etcd_client::Error::LeaseKeepAliveError(
                "lease not found".into()
            )),
            Failure::Refused(_)
        ));
        assert!(matches!(
            classify(etcd_client::Error::LeaseKeepAliveError(
                "channel closed".into()
            )),
            Failure::Unknown(_)
        ));
        assert!(matches!(
            classify(etcd_client::Error::WatchError(
                "failed to create lease keeper".into()
            )),
            Failure::Unknown(_)
        ));
        assert!(matches!(
            classify(etcd_client::Error::InvalidArgs("empty endpoints".into())),
            Failure::Refused(_)
        ));
        let refused = tonic::Status::unavailable("tcp connect error");
        assert!(matches!(
            classify(etcd_client::Error::GRpcStatus(refused)),
            Failure::Unknown(_)
        ));
    }

    #[test]
    fn attempts_describe_the_root_cause() {
        let Failure::NotSent(attempt) = classify(unavailable(true)) else {
            panic!("a connect error is not sent");
        };
        // The root cause is shown once, not repeated when the message already says it.
        assert_eq!(attempt.to_string(), "tcp connect error: Connection refused");
        let Failure::Unknown(attempt) = classify(unavailable(false)) else {
            panic!("a timeout is unknown");
        };
        assert_eq!(attempt.to_string(), "etcdserver: request timed out");
        assert_eq!(
            Attempt::TimedOut(Duration::from_secs(3)).to_string(),
            "no answer within 3s"
        );
    }

    #[test]
    fn backoff_doubles_up_to_the_maximum() {
        let policy = RetryPolicy {
            first_backoff: Duration::from_millis(10),
            max_backoff: Duration::from_millis(70),
            ..RetryPolicy::default()
        };
        let pauses: Vec<u128> = (1..=6).map(|n| policy.backoff(n).as_millis()).collect();
        assert_eq!(pauses, [10, 20, 40, 70, 70, 70]);
        assert_eq!(policy.backoff(200), Duration::from_millis(70));
    }

    fn unavailable(connect: bool) -> etcd_client::Error {
        let status = if connect {
            tonic::Status::from_error(Box::new(tonic::ConnectError(
                "tcp connect error: Connection refused".into(),
            )))
        } else {
            tonic::Status::unavailable("etcdserver: request timed out")
        };
        etcd_client::Error::GRpcStatus(status)
    }

    fn quick() -> RetryPolicy {
        RetryPolicy {
            attempt_timeout: Duration::from_secs(1),
            deadline: Duration::from_secs(5),
            first_backoff: Duration::from_millis(1),
            max_backoff: Duration::from_millis(2),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn not_sent_failures_are_retried_for_every_call() {
        for safety in [Safety::Idempotent, Safety::Conditional] {
            let mut calls = 0;
            let answer = run(&quick(), safety, &AtomicU64::new(0), || {
                calls += 1;
                let fail = calls < 3;
                async move {
                    if fail {
                        Err(unavailable(true))
                    } else {
                        Ok(calls)
                    }
                }
            })
            .await
            .unwrap();
            assert_eq!(
                (answer.value, answer.after_unknown),
                (3, false),
                "{safety:?}"
            );
        }
    }

    #[tokio::test(start_paused = true)]
    async fn unknown_outcomes_are_retried_only_for_idempotent_calls() {
        let mut calls = 0;
        let answer = run(&quick(), Safety::Idempotent, &AtomicU64::new(0), || {
            calls += 1;
            let fail = calls < 2;
            async move {
                if fail {
                    Err(unavailable(false))
                } else {
                    Ok(calls)
                }
            }
        })
        .await
        .unwrap();
        assert_eq!((answer.value, answer.after_unknown), (2, true));

        let mut calls = 0;
        let error = run(&quick(), Safety::Conditional, &AtomicU64::new(0), || {
            calls += 1;
            async { Err::<(), _>(unavailable(false)) }
        })
        .await
        .unwrap_err();
        assert!(matches!(error, CallError::OutcomeUnknown(_)), "{error:?}");
        assert_eq!(calls, 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_hung_attempt_times_out_as_unknown() {
        let error = run(&quick(), Safety::Conditional, &AtomicU64::new(0), || {
            std::future::pending::<Result<(), etcd_client::Error>>()
        })
        .await
        .unwrap_err();
        assert!(
            matches!(error, CallError::OutcomeUnknown(Attempt::TimedOut(_))),
            "{error:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn retries_stop_at_the_deadline() {
        let started = Instant::now();
        let mut calls = 0u32;
        let retried = AtomicU64::new(0);
        let error = run(&quick(), Safety::Idempotent, &retried, || {
            calls += 1;
            async { Err::<(), _>(unavailable(true)) }
        })
        .await
        .unwrap_err();
        let CallError::Unavailable { attempts, .. } = error else {
            panic!("expected Unavailable, got {error:?}");
        };
        assert_eq!(attempts, calls);
        assert_eq!(retried.into_inner(), u64::from(calls - 1));
        assert!(calls > 100, "backoff is capped at 2ms: {calls} attempts");
        assert!(started.elapsed() <= quick().deadline);
    }

    #[tokio::test(start_paused = true)]
    async fn refusals_are_not_retried() {
        let mut calls = 0;
        let error = run(&quick(), Safety::Idempotent, &AtomicU64::new(0), || {
            calls += 1;
            async {
                Err::<(), _>(etcd_client::Error::GRpcStatus(tonic::Status::not_found(
                    "etcdserver: requested lease not found",
                )))
            }
        })
        .await
        .unwrap_err();
        assert!(matches!(error, CallError::Refused(_)));
        assert_eq!(calls, 1);
    }
}
