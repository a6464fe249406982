//! The API body over a session of every documented request, in each situation of the VM,
//! and over random and mutated inputs. The fuzzer itself runs in `tests/fuzz.sh`.

use iommu::testing::{fuzz_inputs, write_fuzz_seed};
use proptest::prelude::*;

use super::*;

/// Every request the API documents (some with bad values), a line that is not JSON, one
/// that is JSON but no request, and an empty one.
fn session() -> Vec<u8> {
    let lines = [
        r#"{"cmd":"status"}"#,
        r#"{"cmd":"pause"}"#,
        r#"{"cmd":"resume","force":true}"#,
        r#"{"cmd":"snapshot","dir":"/nonexistent/snap","verify":true}"#,
        r#"{"cmd":"migrate","to":"unix:/nonexistent/sock","max_rounds":63}"#,
        r#"{"cmd":"migrate","to":"tcp:127.0.0.1:1,tls=/nonexistent"}"#,
        r#"{"cmd":"restore","dir":"/nonexistent/snap"}"#,
        r#"{"cmd":"receive","from":"tcp:[::1]:1,insecure"}"#,
        r#"{"cmd":"receive","from":"tcp:host"}"#,
        r#"{"cmd":"commit"}"#,
        r#"{"cmd":"discard"}"#,
        r#"{"cmd":"add-device","vfio-user":"socket=/nonexistent/sock,iommu=on","wait":0}"#,
        r#"{"cmd":"add-device","vfio-user":"dma=sideways"}"#,
        r#"{"cmd":"remove-device","id":"hotplug0","wait":0}"#,
        r#"{"cmd":"quit"}"#,
        r#"{"cmd":"nonsense"}"#,
        "not json",
        "",
        r#"[1,2,3]"#,
    ];
    lines.join("\n").into_bytes()
}

fn seeds() -> Vec<Vec<u8>> {
    (0..4u8)
        .map(|mode| [&[mode][..], &session()].concat())
        .collect()
}

/// The body takes its seeds, which `tests/fuzz.sh` then hands to the fuzzer.
#[test]
fn the_seeds_pass() {
    for (i, seed) in seeds().iter().enumerate() {
        api_requests(seed);
        write_fuzz_seed("api_requests", &format!("session-{i}"), seed);
    }
}

/// A line longer than `MAX_REQUEST` is answered once, with its reason, and ends the session:
/// the requests after it get nothing.
#[test]
fn a_long_line_ends_the_session() {
    let mut data = vec![b'x'; MAX_REQUEST + 1];
    data.extend_from_slice(b"\n{\"cmd\":\"status\"}\n");
    let a = answers(0, &data);
    assert_eq!(a.len(), 1, "{a:?}");
    assert!(
        a[0]["error"].as_str().unwrap().contains("longer than"),
        "{a:?}"
    );
    // The same status request alone is answered.
    let a = answers(0, b"{\"cmd\":\"status\"}\n");
    assert_eq!(a[0]["state"], "waiting", "{a:?}");
}

/// Each request of the session gets its answer in each situation: the body sees every line.
#[test]
fn every_request_line_is_answered() {
    for mode in 0..4u8 {
        let a = answers(mode, &session());
        // The empty line gets nothing.
        let lines = session().split(|&b| b == b'\n').count();
        assert_eq!(a.len(), lines - 1, "mode {mode}: {a:?}");
        assert_eq!(a[0]["ok"], true, "mode {mode}: status");
    }
}

proptest! {
    #![proptest_config(iommu::testing::fuzz_config())]

    #[test]
    fn api_requests_take_any_input(data in fuzz_inputs(seeds()[1].clone())) {
        api_requests(&data);
    }
}
