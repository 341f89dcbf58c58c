//! Kernel struct member offsets from the running kernel's BTF, so one eBPF object works across
//! kernel versions without CO-RE.

use std::path::Path;

use btf_rs::{Btf, Type};
use sensor_ebpf::{KernelOffsets, NO_OFFSET, READ_WINDOW_MAX, ReadWindow, ReadWindows};

/// Where the running kernel publishes its BTF.
pub const VMLINUX_BTF: &str = "/sys/kernel/btf/vmlinux";

#[derive(Debug, thiserror::Error)]
pub enum BtfError {
    #[error(
        "cannot read kernel BTF at {path}: {source} (kernel built without CONFIG_DEBUG_INFO_BTF?)"
    )]
    Read { path: String, source: btf_rs::Error },
    #[error("kernel BTF has no struct {0}")]
    NoStruct(String),
    #[error("kernel BTF has no member {member} in struct {strukt}")]
    NoMember { strukt: String, member: String },
    #[error("kernel BTF: {0}")]
    Parse(#[from] btf_rs::Error),
}

/// Parsed kernel BTF with member-offset look-ups.
pub struct KernelBtf {
    btf: Btf,
}

impl KernelBtf {
    pub fn load() -> Result<Self, BtfError> {
        Self::from_file(Path::new(VMLINUX_BTF))
    }

    pub fn from_file(path: &Path) -> Result<Self, BtfError> {
        let btf = Btf::from_file(path)
            .map_err(|source| BtfError::Read { path: path.display().to_string(), source })?;
        Ok(Self { btf })
    }

    /// Byte offset of `member` in `struct strukt`, looking inside anonymous structs and unions
    /// (such as the one holding `file.f_path`).
    pub fn member_offset(&self, strukt: &str, member: &str) -> Result<u32, BtfError> {
        let s = self.find_struct(strukt)?;
        self.find_member(&s, member)?.map(|bits| bits / 8).ok_or_else(|| BtfError::NoMember {
            strukt: strukt.to_string(),
            member: member.to_string(),
        })
    }

    /// Size in bytes of `struct strukt` (the stride of an array of them).
    pub fn struct_size(&self, strukt: &str) -> Result<u32, BtfError> {
        Ok(self.find_struct(strukt)?.size() as u32)
    }

    /// Number of elements of the array member `member` of `struct strukt`.
    pub fn array_len(&self, strukt: &str, member: &str) -> Result<u32, BtfError> {
        let s = self.find_struct(strukt)?;
        let no_array =
            || BtfError::NoMember { strukt: strukt.to_string(), member: format!("{member}[]") };
        let m = s
            .members
            .iter()
            .find(|m| self.btf.resolve_name(*m).is_ok_and(|n| n == member))
            .ok_or_else(no_array)?;
        match self.btf.resolve_chained_type(m)? {
            Type::Array(a) => Ok(a.len() as u32),
            _ => Err(no_array()),
        }
    }

    fn find_struct(&self, strukt: &str) -> Result<btf_rs::Struct, BtfError> {
        let types = self.btf.resolve_types_by_name(strukt)?;
        match types.into_iter().find(|t| matches!(t, Type::Struct(_))) {
            Some(Type::Struct(s)) => Ok(s),
            _ => Err(BtfError::NoStruct(strukt.to_string())),
        }
    }

    /// Offset in bits of `member` within `s`, recursing into anonymous members.
    fn find_member(&self, s: &btf_rs::Struct, member: &str) -> Result<Option<u32>, BtfError> {
        for m in &s.members {
            let name = self.btf.resolve_name(m).unwrap_or_default();
            if name == member {
                return Ok(Some(m.bit_offset()));
            }
            if name.is_empty()
                && let Some(inner) = self.composite(self.btf.resolve_chained_type(m)?)?
                && let Some(bits) = self.find_member(&inner, member)?
            {
                return Ok(Some(m.bit_offset() + bits));
            }
        }
        Ok(None)
    }

    /// The struct or union behind `t`, skipping typedefs and qualifiers.
    fn composite(&self, mut t: Type) -> Result<Option<btf_rs::Struct>, BtfError> {
        loop {
            match t {
                Type::Struct(s) | Type::Union(s) => return Ok(Some(s)),
                Type::Typedef(_) | Type::Const(_) | Type::Volatile(_) | Type::TypeTag(_) => {
                    let inner = t.as_btf_type().map(|b| self.btf.resolve_chained_type(b));
                    match inner {
                        Some(next) => t = next?,
                        None => return Ok(None),
                    }
                }
                _ => return Ok(None),
            }
        }
    }

    /// True when the kernel knows the BPF helper `name` (`enum bpf_func_id` has
    /// `BPF_FUNC_<name>`).
    pub fn has_helper(&self, name: &str) -> bool {
        let wanted = format!("BPF_FUNC_{name}");
        let Ok(types) = self.btf.resolve_types_by_name("bpf_func_id") else {
            return false;
        };
        types.iter().any(|t| match t {
            Type::Enum(e) => {
                e.members.iter().any(|m| self.btf.resolve_name(m).is_ok_and(|n| n == wanted))
            }
            _ => false,
        })
    }

    /// The BTF id of the kernel function `name` (a kfunc is called by it), if the kernel has it.
    pub fn function_id(&self, name: &str) -> Option<u32> {
        self.type_id(name, |t| matches!(t, Type::Func(_)))
    }

    /// The BTF id of `struct name`.
    pub fn struct_id(&self, name: &str) -> Option<u32> {
        self.type_id(name, |t| matches!(t, Type::Struct(_)))
    }

    fn type_id(&self, name: &str, kind: impl Fn(&Type) -> bool) -> Option<u32> {
        let ids = self.btf.resolve_ids_by_name(name).ok()?;
        ids.into_iter().find(|&id| self.btf.resolve_type_by_id(id).is_ok_and(|t| kind(&t)))
    }

    /// Offset of a member path such as `["f_path", "dentry"]` across nested structs.
    fn path_offset(&self, strukt: &str, path: &[(&str, &str)]) -> Result<u32, BtfError> {
        let mut total = 0;
        let mut current = strukt;
        for &(member, next_struct) in path {
            total += self.member_offset(current, member)?;
            current = next_struct;
        }
        Ok(total)
    }

    /// `io_ring_ctx.file_table.data.<member>` (the fixed-file table since 6.13), or
    /// [`NO_OFFSET`].
    fn fixed_files(&self, member: &str) -> u32 {
        let path = [("file_table", "io_file_table"), ("data", "io_rsrc_data"), (member, "")];
        self.path_offset("io_ring_ctx", &path).unwrap_or(NO_OFFSET)
    }

    /// `strukt.vfs_inode - strukt.member`: how far before a file system's embedded inode its
    /// own `member` lies (`proc_inode.pid`, `btrfs_inode.root`).
    fn before_vfs_inode(&self, strukt: &str, member: &str) -> Result<u32, BtfError> {
        let at = self.member_offset(strukt, member)?;
        let inode = self.member_offset(strukt, "vfs_inode")?;
        inode.checked_sub(at).ok_or_else(|| BtfError::NoMember {
            strukt: strukt.into(),
            member: format!("{member} before vfs_inode"),
        })
    }

    /// Every offset the kernel programs need.
    pub fn kernel_offsets(&self) -> Result<KernelOffsets, BtfError> {
        let task = |m: &str| self.member_offset("task_struct", m);
        Ok(KernelOffsets {
            task_real_parent: task("real_parent")?,
            task_tgid: task("tgid")?,
            task_pid: task("pid")?,
            task_cred: task("cred")?,
            // Only with CONFIG_AUDIT; 0 tells the programs to report "unset".
            task_loginuid: task("loginuid").unwrap_or(0),
            task_files: task("files")?,
            task_mm: task("mm")?,
            task_exit_code: task("exit_code")?,
            cred_euid: self.member_offset("cred", "euid")?,
            cred_egid: self.member_offset("cred", "egid")?,
            cred_cap_effective: self.member_offset("cred", "cap_effective")?,
            files_fdt: self.member_offset("files_struct", "fdt")?,
            fdtable_fd: self.member_offset("fdtable", "fd")?,
            file_f_inode: self.member_offset("file", "f_inode")?,
            file_f_flags: self.member_offset("file", "f_flags")?,
            file_dentry: self.path_offset("file", &[("f_path", "path"), ("dentry", "")])?,
            mm_exe_file: self.member_offset("mm_struct", "exe_file")?,
            dentry_d_parent: self.member_offset("dentry", "d_parent")?,
            dentry_d_inode: self.member_offset("dentry", "d_inode")?,
            dentry_name: self.path_offset("dentry", &[("d_name", "qstr"), ("name", "")])?,
            inode_i_ino: self.member_offset("inode", "i_ino")?,
            inode_i_sb: self.member_offset("inode", "i_sb")?,
            inode_i_mode: self.member_offset("inode", "i_mode")?,
            sb_s_dev: self.member_offset("super_block", "s_dev")?,
            sb_s_magic: self.member_offset("super_block", "s_magic")?,
            file_private_data: self.member_offset("file", "private_data")?,
            socket_sk: self.member_offset("socket", "sk")?,
            sock_family: self
                .path_offset("sock", &[("__sk_common", "sock_common"), ("skc_family", "")])?,
            sock_peer_pid: self.member_offset("sock", "sk_peer_pid")?,
            unix_peer: self.member_offset("unix_sock", "peer")?,
            unix_path_dentry: self.path_offset("unix_sock", &[("path", "path"), ("dentry", "")])?,
            pid_nr: self.path_offset("pid", &[("numbers", "upid"), ("nr", "")])?,
            // Only with CONFIG_IO_URING.
            io_kiocb_opcode: self.member_offset("io_kiocb", "opcode").unwrap_or(NO_OFFSET),
            io_open_file_slot: self.member_offset("io_open", "file_slot").unwrap_or(NO_OFFSET),
            io_kiocb_file: self.member_offset("io_kiocb", "file").unwrap_or(NO_OFFSET),
            io_kiocb_ctx: self.member_offset("io_kiocb", "ctx").unwrap_or(NO_OFFSET),
            io_ctx_files_nr: self.fixed_files("nr"),
            io_ctx_files_nodes: self.fixed_files("nodes"),
            io_rsrc_node_file_ptr: self
                .member_offset("io_rsrc_node", "file_ptr")
                .unwrap_or(NO_OFFSET),
            io_kiocb_flags: self.member_offset("io_kiocb", "flags").unwrap_or(NO_OFFSET),
            proc_inode_pid_back: self.before_vfs_inode("proc_inode", "pid").unwrap_or(NO_OFFSET),
            // Overlayfs wraps its real file since 6.13 (`struct ovl_file`); before, or when
            // overlay is a module not loaded yet (its BTF is not in vmlinux), no wrapper.
            ovl_file_realfile: self.member_offset("ovl_file", "realfile").unwrap_or(NO_OFFSET),
            // Only with btrfs built in (a module's BTF is not in vmlinux).
            btrfs_inode_root_back: self
                .before_vfs_inode("btrfs_inode", "root")
                .unwrap_or(NO_OFFSET),
            btrfs_root_anon_dev: self.member_offset("btrfs_root", "anon_dev").unwrap_or(NO_OFFSET),
            task_thread_pid: task("thread_pid").unwrap_or(NO_OFFSET),
            pid_level: self.member_offset("pid", "level")?,
            pid_numbers: self.member_offset("pid", "numbers")?,
            upid_size: self.struct_size("upid")?,
            upid_ns: self.member_offset("upid", "ns")?,
            pidns_idr_head: self.path_offset(
                "pid_namespace",
                &[("idr", "idr"), ("idr_rt", "xarray"), ("xa_head", "")],
            )?,
            pidns_idr_base: self
                .path_offset("pid_namespace", &[("idr", "idr"), ("idr_base", "")])?,
            xa_node_shift: self.member_offset("xa_node", "shift")?,
            xa_node_slots: self.member_offset("xa_node", "slots")?,
            xa_slots_len: self.array_len("xa_node", "slots")?,
            dentry_name_len: self.path_offset("dentry", &[("d_name", "qstr"), ("len", "")])?,
            vma_vm_file: self.member_offset("vm_area_struct", "vm_file")?,
            // x86-64 register names; other architectures read arguments at syscall entry.
            pt_regs_di: self.member_offset("pt_regs", "di").unwrap_or(NO_OFFSET),
            pt_regs_si: self.member_offset("pt_regs", "si").unwrap_or(NO_OFFSET),
            mm_arg_start: self.member_offset("mm_struct", "arg_start")?,
            mm_arg_end: self.member_offset("mm_struct", "arg_end")?,
        })
    }
}

/// The read windows of the file-open path for these offsets: each covers the fields the
/// programs read from one struct, so one `bpf_probe_read_kernel` replaces one per field.
pub fn read_windows(o: &KernelOffsets) -> ReadWindows {
    ReadWindows {
        file: read_window(&[(o.file_f_inode, 8), (o.file_f_flags, 4), (o.file_dentry, 8)]),
        inode: read_window(&[(o.inode_i_sb, 8), (o.inode_i_ino, 8)]),
        sb: read_window(&[(o.sb_s_dev, 4), (o.sb_s_magic, 8)]),
        dentry: read_window(&[
            (o.dentry_d_parent, 8),
            (o.dentry_name_len, 4),
            (o.dentry_name, 8),
            (o.dentry_d_inode, 8),
        ]),
    }
}

/// The window covering `fields` (offset, size): 8-aligned base, every field naturally aligned
/// from it, at most [`READ_WINDOW_MAX`] bytes; empty (read field by field) otherwise.
pub fn read_window(fields: &[(u32, u32)]) -> ReadWindow {
    let Some(start) = fields.iter().map(|&(off, _)| off).min() else {
        return ReadWindow::default();
    };
    let base = start & !7;
    let end = fields.iter().map(|&(off, size)| off + size).max().unwrap_or(base);
    let aligned = fields.iter().all(|&(off, size)| size.is_power_of_two() && off % size == 0);
    if end - base > READ_WINDOW_MAX || !aligned {
        return ReadWindow::default();
    }
    ReadWindow { base, len: end - base }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_task_struct_offsets_from_this_kernel() {
        let Ok(btf) = KernelBtf::load() else {
            eprintln!("skipped: no readable {VMLINUX_BTF}");
            return;
        };
        let offsets = btf.kernel_offsets().expect("offsets");
        assert!(offsets.task_tgid > 0);
        assert!(offsets.task_real_parent > offsets.task_tgid);
        // The pid-namespace walk: `struct upid { int nr; struct pid_namespace *ns; }`, and the
        // procfs inode's pid pointer at the head of `proc_inode`, before the inode.
        assert_eq!((offsets.upid_size, offsets.upid_ns), (16, 8));
        assert_eq!(offsets.pid_nr, offsets.pid_numbers);
        assert!(offsets.proc_inode_pid_back > 0 && offsets.proc_inode_pid_back != NO_OFFSET);
        assert_ne!(offsets.task_thread_pid, NO_OFFSET);
        assert!(offsets.xa_slots_len.is_power_of_two() && offsets.xa_slots_len >= 16);
        assert!(offsets.xa_node_slots > offsets.xa_node_shift);
        if std::path::Path::new("/proc/sys/kernel/io_uring_disabled").exists() {
            assert_ne!(offsets.io_kiocb_opcode, NO_OFFSET, "io_uring kernel without io_kiocb");
            assert_ne!(offsets.io_open_file_slot, NO_OFFSET);
            assert_ne!(offsets.io_kiocb_ctx, NO_OFFSET);
            assert_ne!(offsets.io_kiocb_flags, NO_OFFSET);
            // The fixed-file table's layout is all there or not at all (before 6.13).
            let table = [
                offsets.io_ctx_files_nr,
                offsets.io_ctx_files_nodes,
                offsets.io_rsrc_node_file_ptr,
            ];
            assert!(table.iter().all(|&o| o != NO_OFFSET) || table.iter().all(|&o| o == NO_OFFSET));
            if table[0] != NO_OFFSET {
                assert_eq!(
                    offsets.io_ctx_files_nodes,
                    offsets.io_ctx_files_nr + 8,
                    "nr, then nodes"
                );
            }
        }
    }

    #[test]
    fn knows_which_helpers_this_kernel_has() {
        let Ok(btf) = KernelBtf::load() else {
            eprintln!("skipped: no readable {VMLINUX_BTF}");
            return;
        };
        assert!(btf.has_helper("probe_read_kernel"));
        assert!(!btf.has_helper("no_such_helper"));
    }

    #[test]
    fn finds_kernel_function_and_struct_ids() {
        let Ok(btf) = KernelBtf::load() else {
            eprintln!("skipped: no readable {VMLINUX_BTF}");
            return;
        };
        let vma = btf.struct_id("vm_area_struct").expect("struct vm_area_struct");
        assert!(vma > 0);
        let socket = btf.struct_id("socket").expect("struct socket");
        assert!(socket > 0 && socket != vma);
        assert_ne!(btf.function_id("bpf_rdonly_cast"), Some(vma));
        assert_eq!(btf.function_id("no_such_kfunc"), None);
    }

    #[test]
    fn finds_members_inside_anonymous_unions() {
        let Ok(btf) = KernelBtf::load() else {
            eprintln!("skipped: no readable {VMLINUX_BTF}");
            return;
        };
        // `f_path` sits in an anonymous union on recent kernels; a flat walk misses it.
        let f_path = btf.member_offset("file", "f_path").expect("file.f_path");
        let f_inode = btf.member_offset("file", "f_inode").expect("file.f_inode");
        assert_ne!(f_path, f_inode);
    }

    #[test]
    fn windows_cover_close_fields_and_give_up_on_far_ones() {
        assert_eq!(read_window(&[(40, 8), (64, 8)]), ReadWindow { base: 40, len: 32 });
        assert_eq!(read_window(&[(16, 4), (96, 8)]), ReadWindow { base: 16, len: 88 });
        assert_eq!(read_window(&[(36, 4), (44, 4)]), ReadWindow { base: 32, len: 16 });
        assert_eq!(read_window(&[(0, 8), (200, 8)]), ReadWindow::default());
        assert_eq!(read_window(&[(4, 8)]), ReadWindow::default(), "misaligned field");
        let Ok(btf) = KernelBtf::load() else {
            eprintln!("skipped: no readable {VMLINUX_BTF}");
            return;
        };
        let offsets = btf.kernel_offsets().expect("offsets");
        let w = read_windows(&offsets);
        for (name, window) in
            [("file", w.file), ("inode", w.inode), ("sb", w.sb), ("dentry", w.dentry)]
        {
            assert!(window.len > 0 && window.len <= READ_WINDOW_MAX, "{name}: {window:?}");
        }
    }

    #[test]
    fn names_missing_members() {
        let Ok(btf) = KernelBtf::load() else {
            eprintln!("skipped: no readable {VMLINUX_BTF}");
            return;
        };
        let err = btf.member_offset("task_struct", "no_such_field").unwrap_err();
        assert_eq!(err.to_string(), "kernel BTF has no member no_such_field in struct task_struct");
    }
}
