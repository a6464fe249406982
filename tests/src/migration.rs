//! What every migration test asks of a migration: the `migrate` request, the report of one
//! that succeeded, a source that handed the guest over, a destination that never ran it.

use std::path::Path;
use std::time::{Duration, Instant};

use crate::{api, Run};

/// `{"cmd":"migrate","to":TO...}` to the API at `api_socket`; `extra` is appended inside the
/// object as written (`,"verify":true`). Returns the report.
pub fn migrate(api_socket: &Path, to: &str, extra: &str) -> serde_json::Value {
    let report = api(
        api_socket,
        &format!(r#"{{"cmd":"migrate","to":"{to}"{extra}}}"#),
    );
    eprintln!("migration report: {report}");
    report
}

/// Waits until `path` exists (a destination's incoming socket, an API socket); panics after
/// 10 s.
pub fn wait_for_path(path: &Path) {
    let start = Instant::now();
    while !path.exists() {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "{} never appeared",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// The report of a migration that succeeded with `verify`: `ok`, all `pages` RAM pages
/// compared equal, no device left untracked.
pub fn assert_migrated(report: &serde_json::Value, pages: u64) {
    assert_eq!(report["ok"], true, "{report}");
    assert_eq!(report["verified_pages"], pages, "{report}");
    assert_eq!(
        report["untracked_devices"],
        serde_json::json!([]),
        "{report}"
    );
}

/// The report of a migration that failed with `verify`'s error: some pages differ.
pub fn assert_verify_failed(report: &serde_json::Value) {
    assert_eq!(report["ok"], false, "{report}");
    let err = report["error"].as_str().unwrap_or_default();
    assert!(
        err.contains("verify: ") && err.contains("pages differ"),
        "{report}"
    );
}

/// The source's run after the hand-over: status 0, the guest ended by the migration.
pub fn assert_handed_over(src: &Run) {
    assert_eq!(src.code(), 0, "{}", src.stderr);
    assert!(
        src.stderr.contains("guest ended (migrated to "),
        "{}",
        src.stderr
    );
}

/// A destination's run that ended with status 1 saying `why`, without its console showing
/// `guest_marker` (a line only the running guest prints).
pub fn assert_never_ran(dst: &Run, why: &str, guest_marker: &str) {
    eprintln!("{}", dst.stderr);
    assert_eq!(dst.code(), 1, "{}", dst.stderr);
    assert!(dst.stderr.contains(why), "{}", dst.stderr);
    assert!(
        !dst.console.contains(guest_marker),
        "the guest ran on the destination:\n{}",
        dst.console
    );
}
