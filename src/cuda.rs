//! What CUDA offers that tch does not wrap: a device's free memory (the KV budget's default)
//! and side streams (training and bundle loads run off the inference worker's stream, so its
//! per-step host read waits for its own kernels only). Reached through `src/device.cpp`,
//! which calls c10's device-neutral interfaces: it builds against a CPU libtorch, and on a
//! host without CUDA every call answers libtorch's reason as an error.
use anyhow::{bail, Result};
use tch::Device;

#[cfg(clipcap_int8)]
unsafe extern "C" {
    fn clipcap_cuda_memory(
        device: i32,
        free: *mut u64,
        total: *mut u64,
        error: *mut std::ffi::c_char,
        capacity: usize,
    ) -> i32;
    fn clipcap_cuda_enter_pool_stream(
        device: i32,
        previous: *mut i64,
        error: *mut std::ffi::c_char,
        capacity: usize,
    ) -> i32;
    fn clipcap_cuda_leave_stream(
        device: i32,
        previous: i64,
        error: *mut std::ffi::c_char,
        capacity: usize,
    ) -> i32;
    fn clipcap_cuda_current_stream(
        device: i32,
        id: *mut i64,
        error: *mut std::ffi::c_char,
        capacity: usize,
    ) -> i32;
}

/// Calls a shim function that fills an error buffer on failure.
#[cfg(clipcap_int8)]
fn call(what: &str, f: impl FnOnce(*mut std::ffi::c_char, usize) -> i32) -> Result<()> {
    let mut buf = [0u8; 512];
    if f(buf.as_mut_ptr().cast(), buf.len()) == 0 {
        return Ok(());
    }
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    let text = String::from_utf8_lossy(&buf[..end]);
    // libtorch's messages end with a C++ backtrace; its first line is the reason.
    bail!("{what}: {}", text.lines().next().unwrap_or("failed"))
}

#[cfg(not(clipcap_int8))]
fn call(what: &str, _: impl FnOnce(*mut std::ffi::c_char, usize) -> i32) -> Result<()> {
    bail!("{what}: this build has no C++ shim (build.rs found no libtorch headers)")
}

fn cuda_index(device: Device) -> Option<i32> {
    match device {
        Device::Cuda(i) => Some(i as i32),
        _ => None,
    }
}

/// Free and total bytes of `device`'s memory, as CUDA reports them; `None` off CUDA.
pub fn memory(device: Device) -> Result<Option<(u64, u64)>> {
    let Some(index) = cuda_index(device) else {
        return Ok(None);
    };
    let (mut free, mut total) = (0u64, 0u64);
    #[cfg(clipcap_int8)]
    // SAFETY: the shim writes the two counts, or at most `capacity` bytes of message.
    call("reading CUDA memory", |e, n| unsafe {
        clipcap_cuda_memory(index, &mut free, &mut total, e, n)
    })?;
    #[cfg(not(clipcap_int8))]
    call("reading CUDA memory", |_, _| index)?;
    Ok(Some((free, total)))
}

/// The id of the calling thread's current stream on `device` (0: the default stream).
pub fn current_stream(device: Device) -> Result<i64> {
    let Some(index) = cuda_index(device) else {
        bail!("{device:?} has no streams");
    };
    let mut id = 0i64;
    #[cfg(clipcap_int8)]
    // SAFETY: the shim writes the id, or at most `capacity` bytes of message.
    call("reading the current CUDA stream", |e, n| unsafe {
        clipcap_cuda_current_stream(index, &mut id, e, n)
    })?;
    #[cfg(not(clipcap_int8))]
    call("reading the current CUDA stream", |_, _| index)?;
    Ok(id)
}

/// While alive, the calling thread's kernels on a CUDA device go to a stream of libtorch's
/// pool instead of the default stream. Dropping it waits for that stream's work (so what was
/// loaded is ready for another thread's stream) and restores the stream it replaced.
/// Bound to the thread that made it: current streams are per thread.
pub struct SideStream {
    device: i32,
    previous: i64,
    _not_send: std::marker::PhantomData<*const ()>,
}

impl SideStream {
    /// Enters a side stream on `device`; `None` off CUDA, where there is nothing to enter.
    pub fn enter(device: Device) -> Result<Option<SideStream>> {
        let Some(index) = cuda_index(device) else {
            return Ok(None);
        };
        let mut previous = 0i64;
        #[cfg(clipcap_int8)]
        // SAFETY: the shim writes the replaced stream's id, or at most `capacity` bytes.
        call("entering a CUDA side stream", |e, n| unsafe {
            clipcap_cuda_enter_pool_stream(index, &mut previous, e, n)
        })?;
        #[cfg(not(clipcap_int8))]
        call("entering a CUDA side stream", |_, _| index)?;
        Ok(Some(SideStream {
            device: index,
            previous,
            _not_send: std::marker::PhantomData,
        }))
    }

    /// [`SideStream::enter`], or the thread's current stream with a warning when CUDA
    /// refuses (the work then still runs, only not apart).
    pub fn enter_or_warn(device: Device, purpose: &str) -> Option<SideStream> {
        SideStream::enter(device).unwrap_or_else(|e| {
            tracing::warn!(error = %format!("{e:#}"), purpose, "running on the current CUDA stream");
            None
        })
    }
}

impl Drop for SideStream {
    fn drop(&mut self) {
        #[cfg(clipcap_int8)]
        // SAFETY: restores the stream id that `enter` read on this same thread.
        let left = call("leaving a CUDA side stream", |e, n| unsafe {
            clipcap_cuda_leave_stream(self.device, self.previous, e, n)
        });
        #[cfg(not(clipcap_int8))]
        let left = call("leaving a CUDA side stream", |_, _| self.device);
        if let Err(e) = left {
            tracing::error!(error = %format!("{e:#}"), "CUDA side stream");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Off CUDA there is nothing to read or enter; on a host without a GPU, asking for CUDA
    /// answers an error (libtorch's reason), never a crash or a made-up number.
    #[test]
    fn off_cuda_nothing_is_entered_and_absent_cuda_is_an_error() {
        assert_eq!(memory(Device::Cpu).unwrap(), None);
        assert!(SideStream::enter(Device::Cpu).unwrap().is_none());
        assert!(SideStream::enter_or_warn(Device::Cpu, "test").is_none());
        if tch::Cuda::is_available() {
            let (free, total) = memory(Device::Cuda(0)).unwrap().unwrap();
            assert!(free > 0 && free <= total, "{free} of {total}");
            assert_eq!(current_stream(Device::Cuda(0)).unwrap(), 0);
            {
                let _side = SideStream::enter(Device::Cuda(0)).unwrap().unwrap();
                assert_ne!(current_stream(Device::Cuda(0)).unwrap(), 0);
            }
            assert_eq!(current_stream(Device::Cuda(0)).unwrap(), 0);
        } else {
            let e = memory(Device::Cuda(0)).unwrap_err().to_string();
            println!("without CUDA: {e}");
            assert!(e.starts_with("reading CUDA memory: "), "{e}");
            let e = SideStream::enter(Device::Cuda(0))
                .err()
                .unwrap()
                .to_string();
            assert!(e.starts_with("entering a CUDA side stream: "), "{e}");
            assert!(SideStream::enter_or_warn(Device::Cuda(0), "test").is_none());
        }
    }
}
