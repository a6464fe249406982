//! `VFIO_USER_DEVICE_FEATURE` (migration v2 and DMA logging, the features and layouts of
//! `struct vfio_device_feature*` in `<linux/vfio.h>`), `VFIO_USER_MIG_DATA_READ` and
//! `VFIO_USER_MIG_DATA_WRITE` (vfio-user.rst, "VFIO_USER_DEVICE_FEATURE").

use vfio_bindings::bindings::vfio::{
    VFIO_DEVICE_FEATURE_DMA_LOGGING_REPORT, VFIO_DEVICE_FEATURE_DMA_LOGGING_START,
    VFIO_DEVICE_FEATURE_DMA_LOGGING_STOP, VFIO_DEVICE_FEATURE_GET, VFIO_DEVICE_FEATURE_MIGRATION,
    VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE, VFIO_DEVICE_FEATURE_PROBE, VFIO_DEVICE_FEATURE_SET,
    VFIO_MIGRATION_P2P, VFIO_MIGRATION_PRE_COPY, VFIO_MIGRATION_STOP_COPY,
};

use super::{
    u32_at, u64_at, VfioUserClient, VfioUserError, CMD_DEVICE_FEATURE, CMD_MIG_DATA_READ,
    CMD_MIG_DATA_WRITE,
};

/// Most device data one migration may carry, in bytes (a bound on what a server makes the
/// VMM hold).
pub const MAX_MIGRATION_DATA: usize = 256 << 20;
/// Most IOVA ranges one `DMA_LOGGING_START` names.
pub const MAX_LOGGING_RANGES: usize = 4096;

/// The server's answer to `VFIO_DEVICE_FEATURE_MIGRATION` GET.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MigrationFeature {
    /// `VFIO_MIGRATION_*` flags.
    pub flags: u64,
}

impl MigrationFeature {
    /// `VFIO_MIGRATION_STOP_COPY`: the minimum the specification requires.
    pub fn stop_copy(&self) -> bool {
        self.flags & u64::from(VFIO_MIGRATION_STOP_COPY) != 0
    }

    /// `VFIO_MIGRATION_P2P`.
    pub fn p2p(&self) -> bool {
        self.flags & u64::from(VFIO_MIGRATION_P2P) != 0
    }

    /// `VFIO_MIGRATION_PRE_COPY`.
    pub fn pre_copy(&self) -> bool {
        self.flags & u64::from(VFIO_MIGRATION_PRE_COPY) != 0
    }
}

impl VfioUserClient {
    /// One `DEVICE_FEATURE` exchange: `flags` (feature index and GET/SET/PROBE), `data` after
    /// the header, room for `reply_data` bytes of reply data. Returns the reply's data.
    fn device_feature(
        &mut self,
        flags: u32,
        data: &[u8],
        reply_data: usize,
    ) -> Result<Vec<u8>, VfioUserError> {
        let argsz = u32::try_from(8 + data.len().max(reply_data))
            .map_err(|_| VfioUserError::Invalid("feature data too large".into()))?;
        let mut body = Vec::with_capacity(8 + data.len());
        body.extend_from_slice(&argsz.to_le_bytes());
        body.extend_from_slice(&flags.to_le_bytes());
        body.extend_from_slice(data);
        let r = self.call(CMD_DEVICE_FEATURE, &body, &[])?;
        if r.len() < 8 || u32_at(&r, 4) != flags {
            return Err(Self::bad(
                CMD_DEVICE_FEATURE,
                "reply shorter than a feature or for other flags",
            ));
        }
        Ok(r[8..].to_vec())
    }

    /// Whether the server supports feature `feature` with the methods in `methods`
    /// (`VFIO_DEVICE_FEATURE_GET`/`SET`): a PROBE.
    ///
    /// # Errors
    /// A dead or misbehaving server; a refusal is `Ok(false)`.
    pub fn probe_feature(&mut self, feature: u32, methods: u32) -> Result<bool, VfioUserError> {
        match self.device_feature(feature | methods | VFIO_DEVICE_FEATURE_PROBE, &[], 0) {
            Ok(_) => Ok(true),
            Err(VfioUserError::Refused { .. }) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// `VFIO_DEVICE_FEATURE_MIGRATION` GET: the migration flags, or `None` when the server
    /// refuses the feature (no migration).
    ///
    /// # Errors
    /// A dead or misbehaving server.
    pub fn migration_feature(&mut self) -> Result<Option<MigrationFeature>, VfioUserError> {
        let flags = VFIO_DEVICE_FEATURE_MIGRATION | VFIO_DEVICE_FEATURE_GET;
        match self.device_feature(flags, &[], 8) {
            Ok(d) if d.len() >= 8 => Ok(Some(MigrationFeature {
                flags: u64_at(&d, 0),
            })),
            Ok(_) => Err(Self::bad(CMD_DEVICE_FEATURE, "migration flags missing")),
            Err(VfioUserError::Refused { .. }) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// `VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE` GET: the device's `enum vfio_device_mig_state`.
    ///
    /// # Errors
    /// [`VfioUserError`].
    pub fn mig_state(&mut self) -> Result<u32, VfioUserError> {
        let flags = VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE | VFIO_DEVICE_FEATURE_GET;
        let d = self.device_feature(flags, &[], 8)?;
        if d.len() < 4 {
            return Err(Self::bad(CMD_DEVICE_FEATURE, "device state missing"));
        }
        Ok(u32_at(&d, 0))
    }

    /// `VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE` SET: moves the device to `state` along one arc
    /// of the migration v2 state machine; returns the state the server reports.
    ///
    /// # Errors
    /// [`VfioUserError::Refused`] for an arc the server refuses (its state is then what it
    /// says, possibly ERROR); [`VfioUserError::Protocol`] when the reply names another state.
    pub fn set_mig_state(&mut self, state: u32) -> Result<u32, VfioUserError> {
        let flags = VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE | VFIO_DEVICE_FEATURE_SET;
        let mut data = state.to_le_bytes().to_vec();
        data.extend_from_slice(&(-1i32).to_le_bytes());
        let d = self.device_feature(flags, &data, 8)?;
        if d.len() < 4 || u32_at(&d, 0) != state {
            return Err(Self::bad(
                CMD_DEVICE_FEATURE,
                format!(
                    "asked for device state {state}, the reply says {:?}",
                    (d.len() >= 4).then(|| u32_at(&d, 0))
                ),
            ));
        }
        Ok(state)
    }

    /// `VFIO_USER_MIG_DATA_READ` until the server returns less than asked (the end of the
    /// stream), at most [`MAX_MIGRATION_DATA`] bytes in all.
    ///
    /// # Errors
    /// [`VfioUserError`]; more data than the bound is refused.
    pub fn read_mig_data(&mut self) -> Result<Vec<u8>, VfioUserError> {
        let chunk = self.caps.xfer() as u32;
        let mut out = Vec::new();
        loop {
            let mut body = (8 + chunk).to_le_bytes().to_vec();
            body.extend_from_slice(&chunk.to_le_bytes());
            let r = self.call(CMD_MIG_DATA_READ, &body, &[])?;
            if r.len() < 8 || u32_at(&r, 4) > chunk || r.len() != 8 + u32_at(&r, 4) as usize {
                return Err(Self::bad(
                    CMD_MIG_DATA_READ,
                    "data size does not match the reply or exceeds the request",
                ));
            }
            let n = u32_at(&r, 4);
            if out.len() + n as usize > MAX_MIGRATION_DATA {
                return Err(VfioUserError::Invalid(format!(
                    "device data beyond {MAX_MIGRATION_DATA} bytes"
                )));
            }
            out.extend_from_slice(&r[8..]);
            if n < chunk {
                return Ok(out);
            }
        }
    }

    /// `VFIO_USER_MIG_DATA_WRITE`, in pieces the server takes.
    ///
    /// # Errors
    /// [`VfioUserError`].
    pub fn write_mig_data(&mut self, data: &[u8]) -> Result<(), VfioUserError> {
        for part in data.chunks(self.caps.xfer()) {
            let mut body = 8u32.to_le_bytes().to_vec();
            body.extend_from_slice(&(part.len() as u32).to_le_bytes());
            body.extend_from_slice(part);
            self.call(CMD_MIG_DATA_WRITE, &body, &[])?;
        }
        Ok(())
    }

    /// Whether the server logs DMA writes (a PROBE of `DMA_LOGGING_START` with SET).
    ///
    /// # Errors
    /// A dead or misbehaving server.
    pub fn dma_logging_supported(&mut self) -> Result<bool, VfioUserError> {
        self.probe_feature(
            VFIO_DEVICE_FEATURE_DMA_LOGGING_START,
            VFIO_DEVICE_FEATURE_SET,
        )
    }

    /// `VFIO_DEVICE_FEATURE_DMA_LOGGING_START` over `ranges` (`(iova, length)`; empty:
    /// everything) at `page_size`; returns the page size the server chose.
    ///
    /// # Errors
    /// [`VfioUserError`]; more than [`MAX_LOGGING_RANGES`] ranges are not sent.
    pub fn dma_logging_start(
        &mut self,
        page_size: u64,
        ranges: &[(u64, u64)],
    ) -> Result<u64, VfioUserError> {
        if ranges.len() > MAX_LOGGING_RANGES {
            return Err(VfioUserError::Invalid(format!(
                "{} logging ranges (at most {MAX_LOGGING_RANGES})",
                ranges.len()
            )));
        }
        let mut data = page_size.to_le_bytes().to_vec();
        data.extend_from_slice(&(ranges.len() as u32).to_le_bytes());
        data.extend_from_slice(&0u32.to_le_bytes());
        for &(iova, len) in ranges {
            data.extend_from_slice(&iova.to_le_bytes());
            data.extend_from_slice(&len.to_le_bytes());
        }
        let flags = VFIO_DEVICE_FEATURE_DMA_LOGGING_START | VFIO_DEVICE_FEATURE_SET;
        let d = self.device_feature(flags, &data, data.len())?;
        let chosen = if d.len() >= 8 { u64_at(&d, 0) } else { 0 };
        if !chosen.is_power_of_two() {
            return Err(Self::bad(
                CMD_DEVICE_FEATURE,
                format!("logging page size {chosen}"),
            ));
        }
        Ok(chosen)
    }

    /// `VFIO_DEVICE_FEATURE_DMA_LOGGING_STOP`.
    ///
    /// # Errors
    /// [`VfioUserError`].
    pub fn dma_logging_stop(&mut self) -> Result<(), VfioUserError> {
        let flags = VFIO_DEVICE_FEATURE_DMA_LOGGING_STOP | VFIO_DEVICE_FEATURE_SET;
        self.device_feature(flags, &[], 0).map(|_| ())
    }

    /// `VFIO_DEVICE_FEATURE_DMA_LOGGING_REPORT` of `[iova, iova + length)` at `page_size`
    /// (reading clears the log), split so that no bitmap exceeds the server's
    /// `max_bitmap_size`. ORs the bits into `bitmap` (bit `i` = the page at
    /// `iova + i * page_size`).
    ///
    /// # Errors
    /// [`VfioUserError`]; a reply whose range or size differs from the request is refused.
    pub fn dma_logging_report(
        &mut self,
        iova: u64,
        length: u64,
        page_size: u64,
        bitmap: &mut [u64],
    ) -> Result<(), VfioUserError> {
        if !page_size.is_power_of_two() || !iova.is_multiple_of(page_size) {
            return Err(VfioUserError::Invalid(format!(
                "report of {iova:#x} at page size {page_size}"
            )));
        }
        let pages = length.div_ceil(page_size);
        if (bitmap.len() as u64) < pages.div_ceil(64) {
            return Err(VfioUserError::Invalid("bitmap too small".into()));
        }
        // Pages per report: a whole number of 64-bit words within the bitmap limit.
        let per = (self.caps.max_bitmap() / 8).max(1) * 64;
        let flags = VFIO_DEVICE_FEATURE_DMA_LOGGING_REPORT | VFIO_DEVICE_FEATURE_GET;
        let mut done = 0u64;
        while done < pages {
            let n = (pages - done).min(per);
            let (a, len) = (iova + done * page_size, n * page_size);
            let mut data = a.to_le_bytes().to_vec();
            data.extend_from_slice(&len.to_le_bytes());
            data.extend_from_slice(&page_size.to_le_bytes());
            let words = n.div_ceil(64) as usize;
            let d = self.device_feature(flags, &data, 24 + 8 * words)?;
            if d.len() != 24 + 8 * words || d[..24] != data[..] {
                return Err(Self::bad(
                    CMD_DEVICE_FEATURE,
                    format!(
                        "report of {a:#x}+{len:#x}: {} bytes for {} expected, or another range",
                        d.len(),
                        24 + 8 * words
                    ),
                ));
            }
            let first_word = (done / 64) as usize;
            for w in 0..words {
                let mut word = u64_at(&d, 24 + 8 * w);
                // Bits past the range must be zero; ignore any a server sets.
                let valid = n - 64 * w as u64;
                if valid < 64 {
                    word &= (1u64 << valid) - 1;
                }
                bitmap[first_word + w] |= word;
            }
            done += n;
        }
        Ok(())
    }
}
