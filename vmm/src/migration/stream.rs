//! The snapshot and migration stream: a header, then checked records.
//!
//! ```text
//! header:  "VMMVIOMU" (8 bytes), u32 version = 1, u32 0            (little-endian)
//! record:  u8 kind, 3 bytes 0, u32 CRC-32 of the payload, u64 payload length, payload
//! ```
//!
//! Kinds: `CONFIG` (JSON: what the VM is made of, checked by the receiver), `RAM` (u64 GPA,
//! then whole 4 KiB pages), `ROUND` (JSON: pre-copy progress, informational), `DEVICE_DATA`
//! (u32 PCI slot, then a passthrough device's own data), `STATE` (JSON: vCPUs, irqchip and
//! every device), `HANDOVER` (JSON: `{"verify":bool,"timeout_ms":N}`, how the hand-over
//! goes), `HASHES` (u64 index of the first RAM page, then one u64 hash per 4 KiB page of
//! RAM in GPA order: a snapshot's own RAM, or the destination's after the migration), `END`,
//! and on a migration's way back and forth after `END`: `ACK` (receiver to sender, JSON:
//! `{"ok":true}` or `{"error":"..."}`, then the receiver's `HASHES` when verifying),
//! `COMMIT` (sender: it stopped for good, run the guest), `ABORT` (sender, JSON reason: it
//! resumes, discard) and `DONE` (receiver: committed). A record longer than its kind allows,
//! a bad checksum, an unknown kind or a stream that ends early is refused with a
//! [`StreamError`] naming the record.

use std::io::{self, Read, Write};

/// Magic at the start of every stream.
pub const MAGIC: &[u8; 8] = b"VMMVIOMU";
/// Version of the format written and read.
pub const VERSION: u32 = 1;

/// Record kinds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Kind {
    /// JSON machine configuration.
    Config = 1,
    /// Guest pages: u64 GPA, then the bytes.
    Ram = 2,
    /// JSON progress of one pre-copy round.
    Round = 3,
    /// A passthrough device's data: u32 slot, then the bytes.
    DeviceData = 4,
    /// JSON machine state.
    State = 5,
    /// End of the stream.
    End = 6,
    /// The receiver's answer.
    Ack = 7,
    /// JSON hand-over options, from the sender.
    Handover = 8,
    /// u64 first page index, then u64 hashes of RAM pages.
    Hashes = 9,
    /// The sender stopped for good: the receiver runs the guest.
    Commit = 10,
    /// JSON reason: the sender resumes the guest, the receiver discards it.
    Abort = 11,
    /// The receiver took the guest over.
    Done = 12,
}

/// Most page hashes in one `HASHES` record.
pub const MAX_HASHES_RECORD: u64 = 1 << 17;

impl Kind {
    /// The kind whose byte is `v`, if any.
    pub fn from_u8(v: u8) -> Option<Kind> {
        Some(match v {
            1 => Kind::Config,
            2 => Kind::Ram,
            3 => Kind::Round,
            4 => Kind::DeviceData,
            5 => Kind::State,
            6 => Kind::End,
            7 => Kind::Ack,
            8 => Kind::Handover,
            9 => Kind::Hashes,
            10 => Kind::Commit,
            11 => Kind::Abort,
            12 => Kind::Done,
            _ => return None,
        })
    }

    /// Largest payload of this kind.
    fn max_len(self) -> u64 {
        match self {
            Kind::Ram => 8 + MAX_RAM_RECORD,
            Kind::State => 64 << 20,
            Kind::DeviceData => 4 + (16 << 20),
            Kind::End | Kind::Commit | Kind::Done => 0,
            Kind::Hashes => 8 + 8 * MAX_HASHES_RECORD,
            Kind::Config | Kind::Round | Kind::Ack | Kind::Handover | Kind::Abort => 1 << 20,
        }
    }
}

/// Most page bytes in one RAM record.
pub const MAX_RAM_RECORD: u64 = 4 << 20;

/// Why a stream was refused.
#[derive(Debug, thiserror::Error)]
pub enum StreamError {
    /// Reading or writing failed (the peer went away, the disk is full).
    #[error("I/O: {0}")]
    Io(#[from] io::Error),
    /// The stream ended in the middle of something.
    #[error("the stream is truncated ({0})")]
    Truncated(String),
    /// Not a stream of this VMM.
    #[error("not a VMM snapshot or migration stream (bad magic)")]
    BadMagic,
    /// Another format version.
    #[error("stream format version {0}; this VMM reads version {VERSION}")]
    Version(u32),
    /// A record failed its check.
    #[error("record #{index} ({kind}): {what}")]
    BadRecord {
        /// Position in the stream, from 0.
        index: u64,
        /// Kind byte as read.
        kind: String,
        /// What is wrong.
        what: String,
    },
}

/// Writes a stream.
pub struct StreamWriter<W: Write> {
    w: W,
    /// Payload bytes written so far.
    pub bytes: u64,
}

impl<W: Write> StreamWriter<W> {
    /// Writes the header.
    ///
    /// # Errors
    /// I/O errors.
    pub fn new(mut w: W) -> Result<Self, StreamError> {
        w.write_all(MAGIC)?;
        w.write_all(&VERSION.to_le_bytes())?;
        w.write_all(&0u32.to_le_bytes())?;
        Ok(Self { w, bytes: 16 })
    }

    /// Writes one record whose payload is the concatenation of `parts`.
    ///
    /// # Errors
    /// I/O errors.
    pub fn record(&mut self, kind: Kind, parts: &[&[u8]]) -> Result<(), StreamError> {
        let len: usize = parts.iter().map(|p| p.len()).sum();
        let mut crc = crc32fast::Hasher::new();
        for p in parts {
            crc.update(p);
        }
        let mut head = [0u8; 16];
        head[0] = kind as u8;
        head[4..8].copy_from_slice(&crc.finalize().to_le_bytes());
        head[8..16].copy_from_slice(&(len as u64).to_le_bytes());
        self.w.write_all(&head)?;
        for p in parts {
            self.w.write_all(p)?;
        }
        self.bytes += 16 + len as u64;
        Ok(())
    }

    /// Writes a JSON record.
    ///
    /// # Errors
    /// I/O errors.
    pub fn json<T: serde::Serialize>(&mut self, kind: Kind, v: &T) -> Result<(), StreamError> {
        let bytes = serde_json::to_vec(v).map_err(|e| StreamError::Io(io::Error::other(e)))?;
        self.record(kind, &[&bytes])
    }

    /// Writes `hashes` (page hashes from [`super::page_hashes`]) as `HASHES` records.
    ///
    /// # Errors
    /// I/O errors.
    pub fn hashes(&mut self, hashes: &[u64]) -> Result<(), StreamError> {
        for (k, chunk) in hashes.chunks(MAX_HASHES_RECORD as usize).enumerate() {
            let first = (k as u64) * MAX_HASHES_RECORD;
            let mut bytes = Vec::with_capacity(8 + 8 * chunk.len());
            bytes.extend_from_slice(&first.to_le_bytes());
            for h in chunk {
                bytes.extend_from_slice(&h.to_le_bytes());
            }
            self.record(Kind::Hashes, &[&bytes])?;
        }
        Ok(())
    }

    /// Flushes the underlying writer.
    ///
    /// # Errors
    /// I/O errors.
    pub fn flush(&mut self) -> Result<(), StreamError> {
        self.w.flush()?;
        Ok(())
    }

    /// The underlying writer.
    pub fn get_mut(&mut self) -> &mut W {
        &mut self.w
    }
}

/// Reads a stream.
pub struct StreamReader<R: Read> {
    r: R,
    index: u64,
}

fn read_exact_or<R: Read>(r: &mut R, buf: &mut [u8], what: &str) -> Result<(), StreamError> {
    r.read_exact(buf).map_err(|e| {
        if e.kind() == io::ErrorKind::UnexpectedEof {
            StreamError::Truncated(what.to_string())
        } else {
            StreamError::Io(e)
        }
    })
}

impl<R: Read> StreamReader<R> {
    /// Reads and checks the header.
    ///
    /// # Errors
    /// [`StreamError::BadMagic`], [`StreamError::Version`], truncation or I/O.
    pub fn new(mut r: R) -> Result<Self, StreamError> {
        let mut head = [0u8; 16];
        read_exact_or(&mut r, &mut head, "in the header")?;
        if &head[..8] != MAGIC {
            return Err(StreamError::BadMagic);
        }
        let version = u32::from_le_bytes([head[8], head[9], head[10], head[11]]);
        if version != VERSION {
            return Err(StreamError::Version(version));
        }
        Ok(Self { r, index: 0 })
    }

    /// A reader that goes on after `index` records of a stream whose header was already read
    /// (by an earlier reader on the same connection).
    pub fn resume(r: R, index: u64) -> Self {
        Self { r, index }
    }

    /// Reads the next record and checks it.
    ///
    /// # Errors
    /// [`StreamError`].
    pub fn next_record(&mut self) -> Result<(Kind, Vec<u8>), StreamError> {
        let index = self.index;
        let mut head = [0u8; 16];
        read_exact_or(
            &mut self.r,
            &mut head,
            &format!("record #{index}: no header"),
        )?;
        let bad = |kind: String, what: String| StreamError::BadRecord { index, kind, what };
        let Some(kind) = Kind::from_u8(head[0]) else {
            return Err(bad(
                format!("kind {}", head[0]),
                "unknown record kind".into(),
            ));
        };
        if head[1..4] != [0, 0, 0] {
            return Err(bad(
                format!("{kind:?}"),
                "reserved bytes are not zero".into(),
            ));
        }
        let crc = u32::from_le_bytes([head[4], head[5], head[6], head[7]]);
        let mut lb = [0u8; 8];
        lb.copy_from_slice(&head[8..16]);
        let len = u64::from_le_bytes(lb);
        if len > kind.max_len() {
            return Err(bad(
                format!("{kind:?}"),
                format!("{len} bytes, at most {} allowed", kind.max_len()),
            ));
        }
        let mut payload = vec![0u8; len as usize];
        read_exact_or(
            &mut self.r,
            &mut payload,
            &format!("record #{index} ({kind:?}) has fewer than its {len} bytes"),
        )?;
        if crc32fast::hash(&payload) != crc {
            return Err(bad(format!("{kind:?}"), "checksum mismatch".into()));
        }
        self.index += 1;
        Ok((kind, payload))
    }

    /// Records read so far.
    pub fn records(&self) -> u64 {
        self.index
    }

    /// The underlying reader.
    pub fn get_mut(&mut self) -> &mut R {
        &mut self.r
    }
}

/// Adds a `HASHES` record's payload to `hashes` (which must hold exactly the hashes before
/// its first index), refusing one that does not continue them or would pass `total`.
///
/// # Errors
/// [`StreamError::BadRecord`].
pub fn add_hashes(
    hashes: &mut Vec<u64>,
    payload: &[u8],
    total: u64,
    index: u64,
) -> Result<(), StreamError> {
    let bad = |what: &str| StreamError::BadRecord {
        index,
        kind: "Hashes".into(),
        what: what.into(),
    };
    if payload.len() < 16 || !(payload.len() - 8).is_multiple_of(8) {
        return Err(bad("not a page index and one or more whole hashes"));
    }
    let first = u64::from_le_bytes(payload[..8].try_into().unwrap_or_default());
    let n = ((payload.len() - 8) / 8) as u64;
    if first != hashes.len() as u64 || first + n > total {
        return Err(bad("hashes out of order or beyond guest RAM"));
    }
    hashes.extend(
        payload[8..]
            .chunks(8)
            .map(|c| u64::from_le_bytes(c.try_into().unwrap_or_default())),
    );
    Ok(())
}

/// Parses a JSON payload, naming `what` in the error.
///
/// # Errors
/// [`StreamError::BadRecord`].
pub fn parse<T: serde::de::DeserializeOwned>(
    what: &str,
    index: u64,
    payload: &[u8],
) -> Result<T, StreamError> {
    serde_json::from_slice(payload).map_err(|e| StreamError::BadRecord {
        index,
        kind: what.to_string(),
        what: e.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Vec<u8> {
        let mut w = StreamWriter::new(Vec::new()).unwrap();
        w.json(Kind::Config, &serde_json::json!({"memory": 1}))
            .unwrap();
        w.record(Kind::Ram, &[&0x1000u64.to_le_bytes(), &[7u8; 4096]])
            .unwrap();
        w.record(Kind::End, &[]).unwrap();
        w.w
    }

    #[test]
    fn round_trip() {
        let bytes = sample();
        let mut r = StreamReader::new(&bytes[..]).unwrap();
        assert_eq!(r.next_record().unwrap().0, Kind::Config);
        let (k, p) = r.next_record().unwrap();
        assert_eq!((k, p.len()), (Kind::Ram, 8 + 4096));
        assert_eq!(r.next_record().unwrap().0, Kind::End);
    }

    #[test]
    fn corruption_and_truncation_are_named() {
        let good = sample();
        assert!(matches!(
            StreamReader::new(&b"not a stream at all"[..]),
            Err(StreamError::BadMagic)
        ));
        let mut v = good.clone();
        v[8] = 9;
        assert!(matches!(
            StreamReader::new(&v[..]),
            Err(StreamError::Version(9))
        ));
        // Flip one page byte: the RAM record's checksum fails.
        let mut v = good.clone();
        let at = v.len() - 16 - 100;
        v[at] ^= 1;
        let mut r = StreamReader::new(&v[..]).unwrap();
        r.next_record().unwrap();
        let e = r.next_record().unwrap_err().to_string();
        assert_eq!(e, "record #1 (Ram): checksum mismatch");
        // Cut the stream inside the RAM record.
        let v = &good[..good.len() - 1000];
        let mut r = StreamReader::new(v).unwrap();
        r.next_record().unwrap();
        assert!(r
            .next_record()
            .unwrap_err()
            .to_string()
            .starts_with("the stream is truncated (record #1 (Ram)"));
        // A huge length is refused before anything is allocated.
        let mut v = good.clone();
        let config_len = u64::from_le_bytes(v[24..32].try_into().unwrap());
        let ram_head = 16 + 16 + config_len as usize;
        v[ram_head + 8..ram_head + 16].copy_from_slice(&u64::MAX.to_le_bytes());
        let mut r = StreamReader::new(&v[..]).unwrap();
        r.next_record().unwrap();
        assert!(r.next_record().unwrap_err().to_string().contains("at most"));
        // An unknown kind.
        let mut v = good;
        v[16] = 99;
        let mut r = StreamReader::new(&v[..]).unwrap();
        assert_eq!(
            r.next_record().unwrap_err().to_string(),
            "record #0 (kind 99): unknown record kind"
        );
    }

    /// Every kind's byte reads back as that kind; no other byte is a kind.
    #[test]
    fn every_kind_byte_reads_back() {
        for v in 0..=u8::MAX {
            let k = Kind::from_u8(v);
            if (1..=12).contains(&v) {
                assert_eq!(k.map(|k| k as u8), Some(v), "byte {v}");
            } else {
                assert_eq!(k, None, "byte {v}");
            }
        }
    }

    /// The largest payload of each kind: a RAM record's GPA and up to 4 MiB of pages, a
    /// device's slot word and up to 16 MiB, a page index and up to 2^17 hashes.
    #[test]
    fn payload_bounds_per_kind() {
        assert_eq!(Kind::Ram.max_len(), 8 + (4 << 20));
        assert_eq!(Kind::DeviceData.max_len(), 4 + (16 << 20));
        assert_eq!(Kind::Hashes.max_len(), 8 + 8 * (1 << 17));
        assert_eq!(Kind::State.max_len(), 64 << 20);
        for k in [Kind::End, Kind::Commit, Kind::Done] {
            assert_eq!(k.max_len(), 0);
        }
    }

    /// A writer's flush reaches the connection under it.
    #[test]
    fn flush_reaches_the_connection() {
        let mut w = StreamWriter::new(std::io::BufWriter::new(Vec::new())).unwrap();
        w.record(Kind::End, &[]).unwrap();
        assert!(w.w.get_ref().is_empty());
        w.flush().unwrap();
        assert!(w.w.buffer().is_empty());
        assert!(!w.w.get_ref().is_empty());
    }

    /// One hash (a page index and 8 bytes) is a whole record.
    #[test]
    fn a_single_hash_is_a_record() {
        let mut hashes = Vec::new();
        let mut payload = 0u64.to_le_bytes().to_vec();
        payload.extend_from_slice(&7u64.to_le_bytes());
        add_hashes(&mut hashes, &payload, 1, 0).unwrap();
        assert_eq!(hashes, vec![7]);
        assert!(add_hashes(&mut hashes, &payload[..15], 2, 1).is_err());
    }
}
