//! Backend log requests to the drone sessions this instance holds: [`LogStreams`] numbers
//! each request, sends it on the drone's command channel (`SchedulerMessage::Logs`) and hands
//! the drone's answers, which the session delivers here, to the request's reader
//! ([`LogStream`]).
//!
//! A request lives as long as its reader and the session that carried it: dropping the
//! reader cancels it on the drone (`CancelLogs`), and a session that ends ends its requests
//! with an error. The answers the reader has not taken yet are bounded ([`MAX_BUFFERED`]):
//! the session never waits on a reader, so a reader that falls that far behind a follow is
//! cut off with a message instead.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use hangar_core::BackendId;
use hangar_core::drone::{LogsFailure, LogsRequest, SchedulerMessage};
use tokio::sync::mpsc;

use crate::drones::DroneConn;

/// The most answer bytes a request keeps for its reader (a whole tail of the drone's default
/// bound fits): past this the request is cut off.
pub const MAX_BUFFERED: usize = 16 * 1024 * 1024;

/// What a drone answered.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LogPiece {
    /// Output (the first piece may be empty: the drone found the logs).
    Data(String),
    /// The end: `None` when everything asked for was sent.
    End(Option<LogsFailure>),
}

/// A request waiting for its answers.
struct Open {
    drone: String,
    /// The registry's number of the session that carried the request.
    session: u64,
    tx: mpsc::UnboundedSender<LogPiece>,
    /// Answer bytes sent to the reader and not taken yet.
    buffered: Arc<AtomicUsize>,
    /// The drone's command channel, to cancel the request.
    commands: mpsc::UnboundedSender<SchedulerMessage>,
}

/// The open log requests of this instance's drone sessions. A std mutex, held for map
/// operations only.
#[derive(Default)]
pub struct LogStreams {
    next: AtomicU64,
    open: Mutex<HashMap<u64, Open>>,
}

impl LogStreams {
    /// Asks drone `conn` for `backend`'s logs; the answers arrive on the returned stream.
    /// `None` when the session has ended.
    pub fn open(
        self: &Arc<Self>,
        conn: &DroneConn,
        backend: BackendId,
        tail: Option<u64>,
        follow: bool,
    ) -> Option<LogStream> {
        let request = self.next.fetch_add(1, Ordering::Relaxed) + 1;
        let (tx, rx) = mpsc::unbounded_channel();
        let buffered = Arc::new(AtomicUsize::new(0));
        self.lock().insert(
            request,
            Open {
                drone: conn.name.clone(),
                session: conn.session,
                tx,
                buffered: buffered.clone(),
                commands: conn.tx.clone(),
            },
        );
        let ask = SchedulerMessage::Logs(LogsRequest {
            request,
            backend,
            tail,
            follow,
        });
        if conn.tx.send(ask).is_err() {
            self.lock().remove(&request);
            return None;
        }
        Some(LogStream {
            streams: self.clone(),
            request,
            rx,
            buffered,
            ended: false,
        })
    }

    /// An answer from session `session` of `drone` for `request`. Answers for a request this
    /// session did not carry (it ended here already) are dropped.
    pub fn deliver(&self, drone: &str, session: u64, request: u64, data: String) {
        let mut open = self.lock();
        let Some(o) = open
            .get(&request)
            .filter(|o| o.drone == drone && o.session == session)
        else {
            return;
        };
        let size = data.len();
        if o.buffered.fetch_add(size, Ordering::Relaxed) + size > MAX_BUFFERED {
            let o = open.remove(&request).expect("found above");
            drop(open);
            tracing::info!(
                drone,
                request,
                "a log reader fell too far behind; cutting it off"
            );
            let _ = o.tx.send(LogPiece::End(Some(LogsFailure::Failed {
                message: format!(
                    "the log stream was cut off: its reader fell more than {} MiB behind the backend's output",
                    MAX_BUFFERED >> 20
                ),
            })));
            let _ = o.commands.send(SchedulerMessage::CancelLogs { request });
            return;
        }
        let _ = o.tx.send(LogPiece::Data(data));
    }

    /// The end of `request`, from session `session` of `drone`.
    pub fn end(&self, drone: &str, session: u64, request: u64, error: Option<LogsFailure>) {
        let mut open = self.lock();
        if open
            .get(&request)
            .is_some_and(|o| o.drone == drone && o.session == session)
            && let Some(o) = open.remove(&request)
        {
            let _ = o.tx.send(LogPiece::End(error));
        }
    }

    /// Ends the requests session `session` of `drone` carried: the session ended.
    pub fn session_ended(&self, drone: &str, session: u64) {
        let ended: Vec<Open> = {
            let mut open = self.lock();
            let ids: Vec<u64> = open
                .iter()
                .filter(|(_, o)| o.drone == drone && o.session == session)
                .map(|(id, _)| *id)
                .collect();
            ids.iter().filter_map(|id| open.remove(id)).collect()
        };
        for o in ended {
            let _ = o.tx.send(LogPiece::End(Some(LogsFailure::Failed {
                message: format!(
                    "the session of drone {drone} ended: run the command again once it has reconnected"
                ),
            })));
        }
    }

    /// How many requests are open (for tests).
    pub fn open_requests(&self) -> usize {
        self.lock().len()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Open>> {
        self.open
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// The reader's end of a log request. Dropping it before the end cancels the request.
pub struct LogStream {
    streams: Arc<LogStreams>,
    request: u64,
    rx: mpsc::UnboundedReceiver<LogPiece>,
    buffered: Arc<AtomicUsize>,
    ended: bool,
}

impl LogStream {
    /// The next answer; `None` after the end.
    pub async fn next(&mut self) -> Option<LogPiece> {
        if self.ended {
            return None;
        }
        let piece = self.rx.recv().await;
        match &piece {
            Some(LogPiece::Data(data)) => {
                self.buffered.fetch_sub(data.len(), Ordering::Relaxed);
            }
            Some(LogPiece::End(_)) | None => self.ended = true,
        }
        piece
    }
}

impl Drop for LogStream {
    fn drop(&mut self) {
        if let Some(o) = self.streams.lock().remove(&self.request) {
            let _ = o.commands.send(SchedulerMessage::CancelLogs {
                request: self.request,
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hangar_core::drone::Capacity;

    fn conn(session: u64) -> (DroneConn, mpsc::UnboundedReceiver<SchedulerMessage>) {
        let (tx, rx) = mpsc::unbounded_channel();
        let conn = DroneConn {
            name: "d1".into(),
            run_id: "r1".into(),
            runtime: "process".into(),
            pool: "default".into(),
            capacity: Capacity::default(),
            tx,
            status: Arc::default(),
            leased: true,
            session,
        };
        (conn, rx)
    }

    fn b1() -> BackendId {
        BackendId::parse("b1").unwrap()
    }

    #[tokio::test]
    async fn answers_reach_their_reader_and_a_dropped_reader_cancels() {
        let streams = Arc::new(LogStreams::default());
        let (conn, mut commands) = conn(1);
        let mut stream = streams.open(&conn, b1(), Some(5), true).unwrap();
        let Some(SchedulerMessage::Logs(asked)) = commands.recv().await else {
            panic!("no request sent");
        };
        assert_eq!((asked.tail, asked.follow), (Some(5), true));
        let id = asked.request;
        streams.deliver("d1", 1, id, "a\n".into());
        // Another session's answers under the same id are not this request's.
        streams.deliver("d1", 2, id, "stale\n".into());
        streams.deliver("d1", 1, id, "b\n".into());
        assert_eq!(stream.next().await, Some(LogPiece::Data("a\n".into())));
        assert_eq!(stream.next().await, Some(LogPiece::Data("b\n".into())));
        drop(stream);
        assert_eq!(
            commands.recv().await,
            Some(SchedulerMessage::CancelLogs { request: id })
        );
        assert_eq!(streams.open_requests(), 0);

        // An ended request is not cancelled when its reader goes.
        let mut stream = streams.open(&conn, b1(), None, false).unwrap();
        let Some(SchedulerMessage::Logs(asked)) = commands.recv().await else {
            panic!("no request sent");
        };
        streams.end("d1", 1, asked.request, None);
        assert_eq!(stream.next().await, Some(LogPiece::End(None)));
        assert_eq!(stream.next().await, None);
        drop(stream);
        assert!(commands.try_recv().is_err());
    }

    #[tokio::test]
    async fn a_session_that_ends_ends_its_requests_and_a_slow_reader_is_cut_off() {
        let streams = Arc::new(LogStreams::default());
        let (conn, mut commands) = conn(7);
        let mut stream = streams.open(&conn, b1(), None, true).unwrap();
        commands.recv().await.unwrap();
        streams.session_ended("d1", 7);
        let Some(LogPiece::End(Some(LogsFailure::Failed { message }))) = stream.next().await else {
            panic!("no end");
        };
        assert!(message.contains("session of drone d1 ended"), "{message}");

        let mut slow = streams.open(&conn, b1(), None, true).unwrap();
        let Some(SchedulerMessage::Logs(asked)) = commands.recv().await else {
            panic!("no request sent");
        };
        let chunk = "x".repeat(64 * 1024);
        for _ in 0..(MAX_BUFFERED / chunk.len() + 1) {
            streams.deliver("d1", 7, asked.request, chunk.clone());
        }
        assert_eq!(
            commands.recv().await,
            Some(SchedulerMessage::CancelLogs {
                request: asked.request
            })
        );
        let mut pieces = 0;
        let end = loop {
            match slow.next().await {
                Some(LogPiece::Data(_)) => pieces += 1,
                Some(LogPiece::End(e)) => break e,
                None => panic!("no end"),
            }
        };
        assert_eq!(pieces, MAX_BUFFERED / chunk.len());
        assert!(
            end.is_some_and(|e| e.message().contains("fell more than")),
            "the reader learns why"
        );
    }

    #[test]
    fn a_request_to_a_gone_session_is_refused() {
        let streams = Arc::new(LogStreams::default());
        let (conn, commands) = conn(1);
        drop(commands);
        assert!(streams.open(&conn, b1(), None, false).is_none());
        assert_eq!(streams.open_requests(), 0);
    }
}
