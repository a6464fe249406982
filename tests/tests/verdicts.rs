//! The scripts' verdict path (`images/common.sh`'s `ktap_summary`, which `run-suite.sh` and
//! `run-net.sh` end with), given consoles of guests that fail: a failing case, a short plan, a
//! panic after the suite, a skipped case where none may be, a device whose suite never
//! reported, no verdict through the test-exit port. Each must fail, and a good console pass.

use vmm_tests::ktap_summary;

/// `ktap_summary CONSOLE LOG ARGS...` with `ended` as the VMM log's last line: its status
/// and output.
fn summary(console: &str, ended: &str, args: &[&str]) -> (bool, String) {
    ktap_summary(console, &format!("{ended}\n"), args)
}

const PASSED: &str = "guest ended (test exit code 0)";

fn suite(dev: &str, lines: &[&str], plan: usize) -> String {
    format!(
        "KTAP version 1\n# vmm_dmatest: {dev} behind an IOMMU\n1..{plan}\n{}\n",
        lines.join("\n")
    )
}

#[test]
fn the_scripts_fail_a_guest_that_fails() {
    let good = suite("0000:00:02.0", &["ok 1 copy_4k", "ok 2 fault_read_only"], 2);
    let (ok, out) = summary(&good, PASSED, &["--suites", "vmm_dmatest", "1"]);
    assert!(ok, "{out}");

    let failing = suite(
        "0000:00:02.0",
        &["ok 1 copy_4k", "not ok 2 fault_read_only # x (-5)"],
        2,
    );
    let (ok, out) = summary(&failing, "guest ended (test exit code 1)", &[]);
    assert!(!ok, "a failing case: {out}");
    assert!(out.contains("1 failed"), "{out}");

    let short = suite("0000:00:02.0", &["ok 1 copy_4k"], 2);
    assert!(!summary(&short, PASSED, &[]).0, "a short plan");

    let panic = format!("{good}Kernel panic - not syncing: Attempted to kill init!\n");
    let (ok, out) = summary(&panic, "guest ended (reset)", &[]);
    assert!(!ok, "a panic: {out}");
    assert!(
        out.contains("panic: Kernel panic"),
        "the panic is named: {out}"
    );

    let (ok, out) = summary(&good, "vmm: error: the deadline passed", &[]);
    assert!(!ok && out.contains("verdict: none"), "no verdict: {out}");

    let skipped = suite(
        "0000:00:02.0",
        &[
            "ok 1 copy_4k",
            "ok 2 fault_read_only # SKIP not behind an IOMMU",
        ],
        2,
    );
    let (ok, out) = summary(&skipped, PASSED, &[]);
    assert!(!ok, "a SKIP is not a pass: {out}");
    assert!(out.contains("fault_read_only was skipped"), "{out}");
    let (ok, out) = summary(&skipped, PASSED, &["--skip", "fault_read_only"]);
    assert!(ok, "an expected SKIP: {out}");

    let (ok, out) = summary(&good, PASSED, &["--suites", "vmm_dmatest", "2"]);
    assert!(!ok, "one suite for two devices: {out}");
    assert!(
        out.contains("1 vmm_dmatest suites reported, 2 expected"),
        "{out}"
    );
}
