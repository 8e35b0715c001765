//! Tests of the log files: tails across the two halves, follows across writes, rotations and
//! the writer's end, the size bound, archives and the retention sweep. Real files in a
//! temporary directory; every wait is bounded and waits on a condition.

use std::sync::Arc;

use super::*;

/// Bound on any single wait, so that a broken test fails rather than hangs.
const WAIT: Duration = Duration::from_secs(10);

fn id(s: &str) -> BackendId {
    BackendId::parse(s).unwrap()
}

fn files(dir: &Path, max_bytes: u64) -> Arc<LogFiles> {
    Arc::new(LogFiles::new(LogConfig {
        max_bytes,
        retention: Duration::from_secs(3600),
        ..LogConfig::new(dir, "d1")
    }))
}

/// Reads `backend`'s logs without following; returns everything sent, the chunks joined.
async fn read_all(files: &LogFiles, backend: &BackendId, tail: Option<u64>) -> String {
    let (tx, mut rx) = mpsc::channel(1024);
    files
        .read(backend, tail, false, &tx, &CancellationToken::new())
        .await
        .unwrap();
    drop(tx);
    let mut text = String::new();
    while let Some(chunk) = rx.recv().await {
        text.push_str(&chunk);
    }
    text
}

/// A follow of all of `backend`'s output on a task, with the channel it sends on.
fn spawn_follow(
    files: &Arc<LogFiles>,
    backend: &BackendId,
) -> (
    tokio::task::JoinHandle<Result<(), LogsError>>,
    mpsc::Receiver<String>,
) {
    let (tx, rx) = mpsc::channel(1024);
    let (files, b) = (files.clone(), backend.clone());
    let follow = tokio::spawn(async move {
        files
            .read(&b, None, true, &tx, &CancellationToken::new())
            .await
    });
    (follow, rx)
}

/// Receives chunks until their text contains `needle`; returns all of it.
async fn until_contains(rx: &mut mpsc::Receiver<String>, needle: &str) -> String {
    let mut text = String::new();
    while !text.contains(needle) {
        let chunk = tokio::time::timeout(WAIT, rx.recv())
            .await
            .unwrap_or_else(|_| panic!("no {needle:?} within {WAIT:?}; got {text:?}"))
            .unwrap_or_else(|| panic!("the follow ended before {needle:?}; got {text:?}"));
        text.push_str(&chunk);
    }
    text
}

#[test]
fn chunks_end_at_line_ends_and_long_lines_are_cut_at_character_boundaries() {
    let mut c = Chunker::default();
    assert!(c.push(b"partial").is_empty(), "no line end yet");
    assert_eq!(c.push(b" line\nnext"), vec!["partial line\n"]);
    assert_eq!(c.finish().as_deref(), Some("next"));
    assert_eq!(c.finish(), None);

    // Several lines go into one chunk, up to the bound.
    let line = "x".repeat(1000) + "\n";
    let many = line.repeat(200);
    let chunks = c.push(many.as_bytes());
    assert!(chunks.len() >= 3, "{}", chunks.len());
    assert!(
        chunks
            .iter()
            .all(|k| k.len() <= LOG_CHUNK_MAX && k.ends_with('\n'))
    );
    assert_eq!(chunks.concat(), many);

    // A line longer than the bound, of 3-byte characters placed so that the bound falls
    // inside one: cut before it, nothing replaced.
    let long = format!("a{}\n", "€".repeat(LOG_CHUNK_MAX / 3 + 10));
    let chunks = c.push(long.as_bytes());
    assert!(chunks.iter().all(|k| k.len() <= LOG_CHUNK_MAX));
    assert_eq!(chunks.concat(), long);
    assert!(!chunks.concat().contains('\u{FFFD}'));
}

#[test]
fn character_boundaries() {
    assert_eq!(char_boundary(b"abc"), 3);
    let euro = "€".as_bytes(); // E2 82 AC
    assert_eq!(char_boundary(&[b'a', euro[0]]), 1);
    assert_eq!(char_boundary(&[b'a', euro[0], euro[1]]), 1);
    assert_eq!(char_boundary(&[b'a', euro[0], euro[1], euro[2]]), 4);
    // Not UTF-8 at all: kept whole (the lossy conversion replaces it).
    assert_eq!(char_boundary(&[b'a', 0x80, 0x80, 0x80, 0x80]), 5);
}

#[test]
fn line_buffers_hand_over_whole_lines() {
    let mut b = LineBuffer::default();
    assert_eq!(b.push(b"GET / 200"), None);
    assert_eq!(b.push(b"\nGET /x").as_deref(), Some(&b"GET / 200\n"[..]));
    assert_eq!(b.finish().as_deref(), Some(&b"GET /x"[..]));
    let huge = vec![b'y'; LOG_CHUNK_MAX];
    assert_eq!(b.push(&huge).map(|v| v.len()), Some(LOG_CHUNK_MAX));
}

#[test]
fn newest_keeps_the_end_from_a_line_start() {
    assert_eq!(newest(b"a\nb\nc\n", 100), b"a\nb\nc\n");
    assert_eq!(newest(b"aaaa\nbb\ncc\n", 5), b"cc\n");
    assert_eq!(
        newest(b"aaaaaaaa", 3),
        b"aaa",
        "no line start: the bytes as they are"
    );
}

#[tokio::test]
async fn tails_span_both_halves_and_a_last_line_without_its_end() {
    let dir = tempfile::tempdir().unwrap();
    let files = files(dir.path(), 1 << 20);
    let b = id("tail1");
    std::fs::write(files.previous_path(&b), "one\ntwo\n").unwrap();
    std::fs::write(files.path(&b), "three\nfour\nfive").unwrap();
    assert_eq!(
        read_all(&files, &b, None).await,
        "one\ntwo\nthree\nfour\nfive"
    );
    assert_eq!(read_all(&files, &b, Some(1)).await, "five");
    assert_eq!(read_all(&files, &b, Some(3)).await, "three\nfour\nfive");
    assert_eq!(
        read_all(&files, &b, Some(4)).await,
        "two\nthree\nfour\nfive"
    );
    assert_eq!(
        read_all(&files, &b, Some(99)).await,
        "one\ntwo\nthree\nfour\nfive"
    );
    assert_eq!(read_all(&files, &b, Some(0)).await, "");

    std::fs::write(files.path(&b), "three\n").unwrap();
    assert_eq!(read_all(&files, &b, Some(1)).await, "three\n");
    assert_eq!(read_all(&files, &b, Some(2)).await, "two\nthree\n");

    // A tail longer than one block.
    let big: String = (0..20_000).map(|i| format!("line {i}\n")).collect();
    std::fs::write(files.path(&b), &big).unwrap();
    std::fs::remove_file(files.previous_path(&b)).unwrap();
    assert_eq!(
        read_all(&files, &b, Some(2)).await,
        "line 19998\nline 19999\n"
    );
    assert_eq!(read_all(&files, &b, None).await, big);
}

#[tokio::test]
async fn an_unknown_backend_has_no_logs_and_the_message_says_where_and_for_how_long() {
    let dir = tempfile::tempdir().unwrap();
    let files = files(dir.path(), 1 << 20);
    let (tx, _rx) = mpsc::channel(8);
    let error = files
        .read(&id("nope"), None, true, &tx, &CancellationToken::new())
        .await
        .unwrap_err();
    assert!(matches!(error, LogsError::NotFound { .. }));
    let message = error.to_string();
    assert!(
        message.contains("no logs for backend nope on drone d1") && message.contains("1h"),
        "{message}"
    );
    assert!(matches!(error.to_wire(), LogsFailure::NotFound { .. }));
}

/// A follow sends the tail (or an empty opening chunk), then each write as it happens, and
/// ends once the writer is gone and everything was sent.
#[tokio::test]
async fn a_follow_sends_new_lines_until_the_writer_ends() {
    let dir = tempfile::tempdir().unwrap();
    let files = files(dir.path(), 1 << 20);
    let b = id("follow1");
    let mut writer = files.writer(&b).unwrap();
    let (tx, mut rx) = mpsc::channel(64);
    let follow = {
        let files = files.clone();
        let b = b.clone();
        tokio::spawn(async move {
            files
                .read(&b, Some(10), true, &tx, &CancellationToken::new())
                .await
        })
    };
    let opening = tokio::time::timeout(WAIT, rx.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(opening, "", "nothing written yet: an empty opening chunk");
    writer.write(b"listening on 127.0.0.1:1\n").unwrap();
    until_contains(&mut rx, "listening on").await;
    writer.write(b"GET / 200\n").unwrap();
    writer.write(b"GET /count 200\nhalf a li").unwrap();
    let text = until_contains(&mut rx, "GET /count 200\n").await;
    assert_eq!(text, "GET / 200\nGET /count 200\n");
    writer.write(b"ne\n").unwrap();
    until_contains(&mut rx, "half a line\n").await;
    // The writer's end ends the follow, after the last write.
    writer.write(b"bye\n").unwrap();
    drop(writer);
    let mut rest = String::new();
    while let Some(chunk) = tokio::time::timeout(WAIT, rx.recv()).await.unwrap() {
        rest.push_str(&chunk);
    }
    assert_eq!(rest, "bye\n");
    follow.await.unwrap().unwrap();
}

#[tokio::test]
async fn a_follow_of_an_ended_backend_ends_after_the_tail() {
    let dir = tempfile::tempdir().unwrap();
    let files = files(dir.path(), 1 << 20);
    let b = id("ended1");
    {
        let mut writer = files.writer(&b).unwrap();
        writer.write(b"a\nb\n").unwrap();
    }
    let (tx, mut rx) = mpsc::channel(64);
    tokio::time::timeout(
        WAIT,
        files.read(&b, Some(1), true, &tx, &CancellationToken::new()),
    )
    .await
    .expect("the follow of an ended backend ended")
    .unwrap();
    drop(tx);
    assert_eq!(rx.recv().await.as_deref(), Some("b\n"));
    assert_eq!(rx.recv().await, None);
}

#[tokio::test]
async fn cancelling_a_follow_ends_it() {
    let dir = tempfile::tempdir().unwrap();
    let files = files(dir.path(), 1 << 20);
    let b = id("cancel1");
    let _writer = files.writer(&b).unwrap();
    let (tx, mut rx) = mpsc::channel(64);
    let cancel = CancellationToken::new();
    let follow = {
        let (files, b, cancel) = (files.clone(), b.clone(), cancel.clone());
        tokio::spawn(async move { files.read(&b, None, true, &tx, &cancel).await })
    };
    assert_eq!(rx.recv().await.as_deref(), Some(""));
    cancel.cancel();
    tokio::time::timeout(WAIT, follow)
        .await
        .expect("the cancelled follow ended")
        .unwrap()
        .unwrap();
}

/// The size bound: the writer rotates at half of it, so at most `max_bytes` are kept, the
/// newest; a follow reads on across rotations without losing or repeating a line.
#[tokio::test]
async fn the_size_bound_keeps_the_newest_output_and_a_follow_reads_across_rotations() {
    let dir = tempfile::tempdir().unwrap();
    let max = 200;
    let files = files(dir.path(), max);
    let b = id("bound1");
    let mut writer = files.writer(&b).unwrap();
    let (follow, mut rx) = spawn_follow(&files, &b);
    assert_eq!(rx.recv().await.as_deref(), Some(""));
    let mut expected = String::new();
    for i in 0..100 {
        let line = format!("line {i:03}\n");
        writer.write(line.as_bytes()).unwrap();
        expected.push_str(&line);
        // Paced by what the follow has seen, so that it never falls a whole rotation behind.
        until_contains(&mut rx, &line).await;
    }
    drop(writer);
    follow.await.unwrap().unwrap();

    let kept = read_all(&files, &b, None).await;
    assert!(kept.len() as u64 <= max, "{} bytes kept", kept.len());
    assert!(kept.len() as u64 >= max / 2, "{} bytes kept", kept.len());
    assert!(
        expected.ends_with(&kept),
        "the newest output is kept: {kept:?}"
    );
    let on_disk = std::fs::metadata(files.path(&b)).unwrap().len()
        + std::fs::metadata(files.previous_path(&b)).unwrap().len();
    assert_eq!(on_disk, kept.len() as u64);
}

#[tokio::test]
async fn a_follow_that_sees_every_line_once_across_rotations() {
    let dir = tempfile::tempdir().unwrap();
    let files = files(dir.path(), 120);
    let b = id("bound2");
    let mut writer = files.writer(&b).unwrap();
    let (follow, mut rx) = spawn_follow(&files, &b);
    let mut seen = tokio::time::timeout(WAIT, rx.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(seen, "", "the opening chunk");
    let mut expected = String::new();
    for i in 0..40 {
        let line = format!("l{i:02}\n");
        writer.write(line.as_bytes()).unwrap();
        expected.push_str(&line);
        seen = until_contains_after(&mut rx, seen, &line).await;
    }
    assert_eq!(seen, expected, "every line once, in order");
    drop(writer);
    follow.await.unwrap().unwrap();
}

/// Like [`until_contains`], starting from what was already received.
async fn until_contains_after(
    rx: &mut mpsc::Receiver<String>,
    mut text: String,
    needle: &str,
) -> String {
    while !text.contains(needle) {
        let chunk = tokio::time::timeout(WAIT, rx.recv())
            .await
            .unwrap_or_else(|_| panic!("no {needle:?} within {WAIT:?}; got {text:?}"))
            .expect("the follow ended early");
        text.push_str(&chunk);
    }
    text
}

#[tokio::test]
async fn an_archive_replaces_the_log_with_the_newest_output() {
    let dir = tempfile::tempdir().unwrap();
    let files = files(dir.path(), 10);
    let b = id("arch1");
    std::fs::write(files.previous_path(&b), "old\n").unwrap();
    files.archive(&b, b"first line\nsecond\nthird\n").unwrap();
    assert_eq!(read_all(&files, &b, None).await, "third\n");
    assert!(!files.previous_path(&b).exists());
    assert!(files.has(&b));
}

/// The janitor removes the files of backends that ended more than the retention period ago
/// (by their last write), never those of a backend being written, and leftovers of archives.
#[test]
fn the_sweep_removes_only_what_is_past_retention_and_not_being_written() {
    let dir = tempfile::tempdir().unwrap();
    let files = files(dir.path(), 1 << 20);
    let (ended, running) = (id("old1"), id("run1"));
    std::fs::write(files.path(&ended), "x\n").unwrap();
    std::fs::write(files.previous_path(&ended), "w\n").unwrap();
    std::fs::write(dir.path().join("old2.log.tmp"), "t").unwrap();
    std::fs::write(dir.path().join("unrelated.txt"), "keep").unwrap();
    let mut writer = files.writer(&running).unwrap();
    writer.write(b"still here\n").unwrap();

    let now = SystemTime::now();
    assert_eq!(
        files.sweep(now).unwrap(),
        0,
        "nothing is past retention yet"
    );
    let later = now + Duration::from_secs(3600 + 60);
    assert_eq!(files.sweep(later).unwrap(), 3);
    assert!(!files.has(&ended));
    assert!(
        files.path(&running).exists(),
        "a backend being written keeps its log"
    );
    assert!(dir.path().join("unrelated.txt").exists());

    // Once its writer is gone, its logs age like any other's.
    drop(writer);
    assert_eq!(files.sweep(later).unwrap(), 1);
    assert!(!files.has(&running));
    // No directory at all: nothing to do.
    let gone = super::LogFiles::new(LogConfig::new(dir.path().join("nope"), "d1"));
    assert_eq!(gone.sweep(later).unwrap(), 0);
}

#[test]
fn durations_read_like_the_flags() {
    assert_eq!(human(Duration::from_secs(24 * 3600)), "24h");
    assert_eq!(human(Duration::from_secs(90 * 60)), "90m");
    assert_eq!(human(Duration::from_secs(90)), "90s");
    assert_eq!(human(Duration::from_millis(1500)), "1500ms");
}
