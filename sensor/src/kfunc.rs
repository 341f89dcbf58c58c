//! Kfunc call sites in the kernel object, patched for the running kernel before load.
//!
//! A kfunc is called by its BTF id, which differs from kernel to kernel and which aya does not
//! resolve. The programs emit each call with a marker instead of the id
//! ([`sensor_ebpf::KFUNC_RDONLY_CAST_CALL`]); before load, every such instruction gets the
//! running kernel's id, or becomes `r0 = 0` (a NULL result the programs fall back on) when the
//! kernel lacks the function.

use sensor_ebpf::{INSN_R0_ZERO, KFUNC_RDONLY_CAST_CALL};

/// How the kfunc call sites were patched.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Patched {
    /// Call sites found.
    pub sites: usize,
    /// The calls are live (a kfunc id was given and the object has call sites).
    pub rdonly_cast: bool,
}

/// `object` with its `bpf_rdonly_cast` call sites patched to call `kfunc_id` (the running
/// kernel's, from [`crate::loader::KernelMode`]), or to yield NULL.
pub fn patch(object: &[u8], kfunc_id: Option<u32>) -> (Vec<u8>, Patched) {
    let mut out = object.to_vec();
    let marker = KFUNC_RDONLY_CAST_CALL.to_le_bytes();
    let replacement = match kfunc_id {
        Some(id) => (KFUNC_RDONLY_CAST_CALL & 0xffff_ffff | u64::from(id) << 32).to_le_bytes(),
        None => INSN_R0_ZERO.to_le_bytes(),
    };
    let mut sites = 0;
    // Instructions are 8-byte aligned within their section, and sections within the file.
    for insn in out.chunks_exact_mut(8) {
        if insn == marker {
            insn.copy_from_slice(&replacement);
            sites += 1;
        }
    }
    (out, Patched { sites, rdonly_cast: kfunc_id.is_some() && sites > 0 })
}

#[cfg(test)]
mod tests {
    use sensor_ebpf::KFUNC_MARKER_RDONLY_CAST;

    use super::*;

    fn object_with_calls(n: usize) -> Vec<u8> {
        let mut object = vec![0x11u8; 8];
        for _ in 0..n {
            object.extend_from_slice(&KFUNC_RDONLY_CAST_CALL.to_le_bytes());
            object.extend_from_slice(&[0x95, 0, 0, 0, 0, 0, 0, 0]); // exit
        }
        object
    }

    #[test]
    fn every_call_site_gets_the_kernels_id() {
        let (out, patched) = patch(&object_with_calls(3), Some(0x1234));
        assert_eq!(patched, Patched { sites: 3, rdonly_cast: true });
        let call = u64::from_le_bytes(out[8..16].try_into().unwrap());
        assert_eq!(call & 0xff, 0x85, "still a call");
        assert_eq!(call >> 8 & 0xff, 0x20, "to a kfunc");
        assert_eq!(call >> 32, 0x1234);
        assert!(!out.windows(4).any(|w| w == KFUNC_MARKER_RDONLY_CAST.to_le_bytes()));
    }

    #[test]
    fn without_the_kfunc_each_call_yields_null() {
        let (out, patched) = patch(&object_with_calls(2), None);
        assert_eq!(patched, Patched { sites: 2, rdonly_cast: false });
        assert_eq!(&out[8..16], &INSN_R0_ZERO.to_le_bytes());
        assert_eq!(&out[24..32], &INSN_R0_ZERO.to_le_bytes());
    }

    #[test]
    fn patches_the_built_object_when_it_has_one() {
        if crate::EBPF_OBJECT.is_empty() {
            return;
        }
        let (_, patched) = patch(crate::EBPF_OBJECT, Some(1));
        assert!(patched.sites > 0, "the file programs call bpf_rdonly_cast");
    }
}
