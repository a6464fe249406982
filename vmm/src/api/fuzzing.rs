//! The body of the `api_requests` fuzz target (`devices/fuzz`, run by `tests/fuzz.sh`): what a
//! client of the control socket sends, served as a connection is. The unit tests below run it
//! over a session of every documented request and over random and mutated inputs.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;

use sync::MutexExt;

use super::{serve, ApiTarget, MAX_REQUEST};

/// Most bytes of one fuzzed session: two of the longest lines and then some.
const MAX_SESSION: usize = 2 * MAX_REQUEST + 4096;

/// Serves `session` (then the end of the stream) on one connection to a VM in the situation
/// `mode` says (see [`api_requests`]); returns the answers, one JSON value per line.
///
/// # Panics
/// When an answer is not JSON.
pub fn answers(mode: u8, session: &[u8]) -> Vec<serde_json::Value> {
    let target = ApiTarget::default();
    if mode & 1 == 1 {
        let (tx, _) = std::sync::mpsc::channel();
        *target.incoming.locked() = Some(tx);
    }
    if mode & 2 == 2 {
        let (tx, _) = std::sync::mpsc::channel();
        *target.handover.locked() = Some(("the source went quiet".into(), tx));
    }
    let Ok((client, server)) = UnixStream::pair() else {
        return Vec::new();
    };
    let Ok(mut reader) = client.try_clone() else {
        return Vec::new();
    };
    let mut writer = client;
    let text = std::thread::scope(|s| {
        s.spawn(move || {
            let _ = writer.write_all(session);
            let _ = writer.shutdown(std::net::Shutdown::Write);
        });
        let read = s.spawn(move || {
            let mut text = String::new();
            let _ = reader.read_to_string(&mut text);
            text
        });
        serve(server, &target);
        read.join().unwrap_or_default()
    });
    text.lines()
        .map(|a| {
            serde_json::from_str(a).unwrap_or_else(|e| panic!("an answer is not JSON ({e}): {a}"))
        })
        .collect()
}

/// `data[0]` sets the VM's situation: bit 0, a VM waiting for `restore` or `receive` (whose
/// loader is gone); bit 1, a received guest waiting for `commit` or `discard` (whose decider is
/// gone); neither, a VM with nothing to serve yet. The rest (at most 132 KiB) is what the
/// client writes before it closes its side.
///
/// # Panics
/// When an answer is not one JSON object with a boolean `"ok"` (and, when false, a string
/// `"error"`), when there are more answers than request lines, or when anything below
/// panics.
pub fn api_requests(data: &[u8]) {
    let Some((&mode, session)) = data.split_first() else {
        return;
    };
    let session = &session[..session.len().min(MAX_SESSION)];
    let answers = answers(mode, session);
    let lines = session.split(|&b| b == b'\n').count();
    assert!(
        answers.len() <= lines,
        "{} answers to {lines} lines",
        answers.len()
    );
    for a in answers {
        match a.get("ok") {
            Some(serde_json::Value::Bool(true)) => {}
            Some(serde_json::Value::Bool(false)) => assert!(
                a.get("error").is_some_and(serde_json::Value::is_string),
                "a refusal without its reason: {a}"
            ),
            _ => panic!("an answer without \"ok\": {a}"),
        }
    }
}

#[cfg(test)]
mod tests;
