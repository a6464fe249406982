//! The control API's messages, shared by the server (`api`) and `vmm-ctl`: one [`Request`]
//! per line, one [`Response`] line back. The JSON forms are the table in the `api` module's
//! documentation.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::machine::hotplug::{AddedDevice, RemovedDevice};
use crate::machine::MigrationStatus;
use crate::migration::{MigrateOptions, MigrationReport};

/// A request: `{"cmd":"NAME", ...arguments}`. Fields a command does not take are ignored,
/// except by `migrate`, which refuses them.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "kebab-case")]
pub enum Request {
    /// The VM's state, and a running migration's progress.
    Status,
    /// Every device's counters, one line per device (what `--counters` prints at exit).
    Counters,
    /// Park the vCPUs.
    Pause,
    /// Run the vCPUs again. `force` resumes a guest whose hand-over was not confirmed.
    Resume {
        /// Resume even though the guest may run on the destination.
        #[serde(default)]
        force: bool,
    },
    /// Write `snapshot.vmm` into `dir` (with page hashes when `verify`).
    Snapshot {
        /// The directory.
        dir: PathBuf,
        /// Store page hashes that a restore checks.
        #[serde(default)]
        verify: bool,
    },
    /// Migrate the running guest.
    Migrate(MigrateOptions),
    /// Restore a snapshot (a VM started with `--incoming defer`).
    Restore {
        /// The directory holding `snapshot.vmm`.
        dir: PathBuf,
    },
    /// Receive a migration (a VM started with `--incoming defer`).
    Receive {
        /// `unix:PATH`, `tcp:HOST:PORT,tls=DIR` or `tcp:HOST:PORT,insecure`.
        from: String,
    },
    /// Run a received guest whose hand-over was not confirmed.
    Commit,
    /// Drop a received guest whose hand-over was not confirmed.
    Discard,
    /// Add a passthrough device in a free hot-plug slot (`--hotplug`); answers once the
    /// guest enabled it, or at the wait's end.
    AddDevice {
        /// A vfio-user device, as `--vfio-user` takes it: `socket=PATH[,iommu=on][,dma=...]`.
        #[serde(rename = "vfio-user", default, skip_serializing_if = "Option::is_none")]
        vfio_user: Option<String>,
        /// A host device through VFIO, as `--vfio` takes it: `path=SYSFS[,iommu=on]`.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        vfio: Option<String>,
        /// Seconds to wait for the guest (default 30).
        #[serde(default)]
        wait: Option<u64>,
    },
    /// Remove a hot-added device: the guest is asked to eject it, and after `wait` seconds
    /// (default 30) it goes without the guest.
    RemoveDevice {
        /// The id `add-device` answered.
        id: String,
        /// Seconds to wait for the guest's eject.
        #[serde(default)]
        wait: Option<u64>,
    },
    /// Stop the VM.
    Quit,
    /// Test only (the cargo feature `test-hooks`, armed by `VMM_TEST_SECCOMP`): a system call
    /// outside the API threads' filter.
    #[cfg(feature = "test-hooks")]
    TestForbiddenSyscall,
}

impl Request {
    /// The command's name, as in `"cmd"`.
    pub fn name(&self) -> &'static str {
        match self {
            Request::Status => "status",
            Request::Counters => "counters",
            Request::Pause => "pause",
            Request::Resume { .. } => "resume",
            Request::Snapshot { .. } => "snapshot",
            Request::Migrate(_) => "migrate",
            Request::Restore { .. } => "restore",
            Request::Receive { .. } => "receive",
            Request::Commit => "commit",
            Request::Discard => "discard",
            Request::AddDevice { .. } => "add-device",
            Request::RemoveDevice { .. } => "remove-device",
            Request::Quit => "quit",
            #[cfg(feature = "test-hooks")]
            Request::TestForbiddenSyscall => "test-forbidden-syscall",
        }
    }
}

/// An answer: `{"ok":true, ...the reply's fields}` or `{"ok":false,"error":"..."}`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Response {
    /// Whether the request was carried out.
    pub ok: bool,
    /// Why not, when `ok` is false.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// What the command answers.
    #[serde(flatten)]
    pub reply: Reply,
}

impl Response {
    /// A carried-out request's answer.
    pub fn ok(reply: Reply) -> Self {
        Response {
            ok: true,
            error: None,
            reply,
        }
    }

    /// A refused or failed request's answer.
    pub fn error(why: impl std::fmt::Display) -> Self {
        Response {
            ok: false,
            error: Some(why.to_string()),
            reply: Reply::Done {},
        }
    }
}

/// What a command answers besides `ok`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Reply {
    /// `status`.
    Status(StatusReply),
    /// `snapshot`.
    Snapshot(SnapshotReply),
    /// `migrate`: the migration's report.
    Migrated(Box<MigrationReport>),
    /// `counters`: one line per device, `NAME: key=value ...`.
    Counters {
        /// The lines.
        counters: Vec<String>,
    },
    /// `add-device`.
    Added {
        /// Where the device went and how long it took.
        added: AddedDevice,
    },
    /// `remove-device`.
    Removed {
        /// How it went, and what its DMA backend did in all.
        removed: RemovedDevice,
    },
    /// `test-forbidden-syscall`: what the call returned (the VMM stops first under
    /// `--seccomp on`).
    #[cfg(feature = "test-hooks")]
    Syscall {
        /// `sysinfo`'s return value.
        sysinfo: i32,
    },
    /// Every other command: nothing more.
    Done {},
}

/// The VM's state as `status` names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum VmState {
    /// The vCPUs run.
    Running,
    /// Paused through the API.
    Paused,
    /// Started with `--incoming defer`: waits for `restore` or `receive`.
    Waiting,
    /// A received guest waits for the source's COMMIT, or the user's `commit`/`discard`.
    AwaitingCommit,
    /// The guest was handed over without confirmation: it may run on the destination.
    HandoverUnconfirmed,
}

impl VmState {
    /// The name `status` shows.
    pub fn name(self) -> &'static str {
        match self {
            VmState::Running => "running",
            VmState::Paused => "paused",
            VmState::Waiting => "waiting",
            VmState::AwaitingCommit => "awaiting-commit",
            VmState::HandoverUnconfirmed => "handover-unconfirmed",
        }
    }
}

/// `status`'s answer.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StatusReply {
    /// The VM's state.
    pub state: VmState,
    /// Guest RAM in bytes (not while waiting for a guest).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory: Option<u64>,
    /// vCPUs (not while waiting for a guest).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpus: Option<u8>,
    /// In `handover-unconfirmed` or `awaiting-commit`: what resolves it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resolve: Option<String>,
    /// A running migration's progress.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub migration: Option<MigrationStatus>,
}

/// `snapshot`'s answer.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SnapshotReply {
    /// The file written.
    pub path: PathBuf,
    /// Pages written.
    pub pages: u64,
    /// Bytes written.
    pub bytes: u64,
    /// Milliseconds it took (the guest paused throughout).
    pub total_ms: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_read_as_the_api_documents_them() {
        let r = |s: &str| serde_json::from_str::<Request>(s);
        assert!(matches!(r(r#"{"cmd":"status"}"#), Ok(Request::Status)));
        assert!(matches!(
            r(r#"{"cmd":"resume","force":true}"#),
            Ok(Request::Resume { force: true })
        ));
        assert!(matches!(
            r(r#"{"cmd":"resume"}"#),
            Ok(Request::Resume { force: false })
        ));
        match r(r#"{"cmd":"migrate","to":"unix:/m","verify":true,"max_bandwidth":5}"#) {
            Ok(Request::Migrate(o)) => {
                assert_eq!(
                    (o.to.as_str(), o.verify, o.max_bandwidth),
                    ("unix:/m", true, 5)
                );
                assert_eq!(o.max_rounds, MigrateOptions::default().max_rounds);
            }
            other => panic!("{other:?}"),
        }
        assert!(r(r#"{"cmd":"migrate","to":"unix:/m","speed":1}"#)
            .unwrap_err()
            .to_string()
            .contains("speed"));
        assert!(r(r#"{"cmd":"snapshot"}"#)
            .unwrap_err()
            .to_string()
            .contains("dir"));
        assert!(r(r#"{"cmd":"fly"}"#)
            .unwrap_err()
            .to_string()
            .contains("fly"));
        assert!(r(r#"{"verify":true}"#)
            .unwrap_err()
            .to_string()
            .contains("cmd"));
        match r(r#"{"cmd":"add-device","vfio-user":"socket=/s,iommu=on","wait":5}"#) {
            Ok(Request::AddDevice {
                vfio_user: Some(v),
                vfio: None,
                wait,
            }) => {
                assert_eq!((v.as_str(), wait), ("socket=/s,iommu=on", Some(5)));
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            r(r#"{"cmd":"add-device","vfio":"path=/sys/bus/pci/devices/0000:01:00.0"}"#),
            Ok(Request::AddDevice {
                vfio_user: None,
                vfio: Some(_),
                wait: None
            })
        ));
        assert!(matches!(
            r(r#"{"cmd":"remove-device","id":"hotplug0"}"#),
            Ok(Request::RemoveDevice { id, wait: None }) if id == "hotplug0"
        ));

        for req in [
            Request::Status,
            Request::AddDevice {
                vfio_user: Some("socket=/s".into()),
                vfio: None,
                wait: None,
            },
            Request::RemoveDevice {
                id: "hotplug0".into(),
                wait: Some(1),
            },
            Request::Resume { force: true },
            Request::Migrate(MigrateOptions::default()),
            #[cfg(feature = "test-hooks")]
            Request::TestForbiddenSyscall,
        ] {
            let line = serde_json::to_string(&req).unwrap();
            assert!(
                line.contains(&format!("\"cmd\":\"{}\"", req.name())),
                "{line}"
            );
            assert_eq!(
                serde_json::from_str::<Request>(&line).unwrap().name(),
                req.name()
            );
        }
    }

    #[test]
    fn answers_read_back_as_what_was_sent() {
        let status = Response::ok(Reply::Status(StatusReply {
            state: VmState::AwaitingCommit,
            memory: None,
            cpus: None,
            resolve: Some("commit".into()),
            migration: None,
        }));
        let line = serde_json::to_string(&status).unwrap();
        assert_eq!(
            line,
            r#"{"ok":true,"state":"awaiting-commit","resolve":"commit"}"#
        );
        let back: Response = serde_json::from_str(&line).unwrap();
        assert!(matches!(back.reply, Reply::Status(s) if s.state == VmState::AwaitingCommit));
        let progress = MigrationStatus {
            progress: crate::machine::ProgressState {
                phase: crate::machine::MigrationPhase::StopAndCopy,
                round: 3,
                ..Default::default()
            },
            pages_sent: 9,
            round_sent: 2,
        };
        let line = serde_json::to_string(&Response::ok(Reply::Status(StatusReply {
            state: VmState::Running,
            memory: Some(1),
            cpus: Some(1),
            resolve: None,
            migration: Some(progress.clone()),
        })))
        .unwrap();
        for key in [
            r#""phase":"stop-and-copy""#,
            r#""round":3"#,
            r#""round_pages":0"#,
            r#""dirty_pages":0"#,
            r#""dirty_rate":0"#,
            r#""expected_downtime_ms":0"#,
            r#""pages_sent":9"#,
            r#""round_sent":2"#,
        ] {
            assert!(line.contains(key), "{key} in {line}");
        }
        let back: Response = serde_json::from_str(&line).unwrap();
        assert!(matches!(back.reply, Reply::Status(s) if s.migration == Some(progress)));
        let added = AddedDevice {
            id: "hotplug0".into(),
            bdf: "00:1e.0".into(),
            iommu: true,
            enabled: true,
            plugged_ms: 1,
            enabled_ms: 2,
        };
        let line = serde_json::to_string(&Response::ok(Reply::Added {
            added: added.clone(),
        }))
        .unwrap();
        assert!(
            line.starts_with(r#"{"ok":true,"added":{"id":"hotplug0","bdf":"00:1e.0""#),
            "{line}"
        );
        let back: Response = serde_json::from_str(&line).unwrap();
        assert!(matches!(back.reply, Reply::Added { added: a } if a == added));
        let removed = RemovedDevice {
            id: "hotplug0".into(),
            bdf: "00:1e.0".into(),
            ejected: true,
            ejected_ms: 3,
            host_maps: 4,
            host_unmaps: 4,
            mapped_bytes_left: 0,
            left_attached: None,
            domain_freed: false,
        };
        let line = serde_json::to_string(&Response::ok(Reply::Removed {
            removed: removed.clone(),
        }))
        .unwrap();
        let back: Response = serde_json::from_str(&line).unwrap();
        assert!(
            matches!(back.reply, Reply::Removed { removed: r } if r == removed),
            "{line}"
        );
        let err = serde_json::to_string(&Response::error("no")).unwrap();
        assert_eq!(err, r#"{"ok":false,"error":"no"}"#);
        let snap = serde_json::to_string(&Response::ok(Reply::Snapshot(SnapshotReply {
            path: "/d/snapshot.vmm".into(),
            pages: 3,
            bytes: 4,
            total_ms: 5,
        })))
        .unwrap();
        let back: Response = serde_json::from_str(&snap).unwrap();
        assert!(matches!(back.reply, Reply::Snapshot(s) if s.pages == 3));
        let report = MigrationReport {
            pages: 7,
            ..Default::default()
        };
        let line = serde_json::to_string(&Response::ok(Reply::Migrated(Box::new(report)))).unwrap();
        let back: Response = serde_json::from_str(&line).unwrap();
        assert!(matches!(back.reply, Reply::Migrated(r) if r.pages == 7));
        assert_eq!(
            serde_json::to_string(&Response::ok(Reply::Done {})).unwrap(),
            r#"{"ok":true}"#
        );
    }
}
