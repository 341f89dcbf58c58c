//! The process the privileged tests watch: it performs exactly one kind of access, given on its
//! command line, then exits. Kept tiny and dependency-free so its behaviour is obvious.

use std::{
    ffi::CString,
    fs::File,
    io::{Read as _, Write as _},
    net::{TcpStream, UdpSocket},
    os::unix::{ffi::OsStrExt as _, fs::OpenOptionsExt as _, process::CommandExt as _},
    path::Path,
    process::{Command, ExitCode},
};

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let arg = |i: usize| args.get(i).map(String::as_str).unwrap_or_default();
    let result = match arg(0) {
        // read PATH: open and read a file.
        "read" => read(arg(1)),
        // from-memory PATH: copy this program into a memfd named `kw-fileless` and run it from
        // there (fexecve) as `kw-fileless read PATH`: a program with no file on disk.
        "from-memory" => from_memory(arg(1)),
        // read-in DIR NAME: chdir to DIR, open NAME relative to it.
        "read-in" => std::env::set_current_dir(arg(1)).and_then(|()| read(arg(2))),
        // openat DIR NAME: openat(dirfd(DIR), NAME).
        "openat" => openat(arg(1), arg(2)),
        // uring-read PATH: open and read PATH through io_uring, without any open syscall.
        "uring-read" => uring_read(arg(1)),
        // uring-read-fixed PATH SLOT: open PATH through io_uring straight into fixed-file slot
        // SLOT (`auto`: one the kernel picks) and read it from there; no fd ever exists.
        "uring-read-fixed" => uring_read_fixed(arg(1), arg(2)),
        // uring-batch-fixed PATH: one submission opens PATH into a fixed slot, reads it from
        // the slot and closes the slot; their completions are posted together, at the end.
        "uring-batch-fixed" => uring_batch_fixed(arg(1), false),
        // uring-install-fixed PATH: the same submission gives the slot's file an fd instead of
        // reading it, and the file is read through that fd once the slot is closed.
        "uring-install-fixed" => uring_batch_fixed(arg(1), true),
        // uring-unix PATH: connect to a unix stream socket through io_uring (no connect
        // syscall).
        "uring-unix" => uring_unix(arg(1)),
        // by-handle PATH: name_to_handle_at, then open_by_handle_at (needs
        // CAP_DAC_READ_SEARCH), then read.
        "by-handle" => by_handle(arg(1)),
        // overlay-read DIR NAME: in a mount namespace of its own, mount a read-only overlay
        // whose lower layer is DIR and read NAME through it.
        "overlay-read" => overlay_read(arg(1), arg(2)),
        // open-path PATH: an O_PATH handle to PATH (it cannot read), then close it.
        "open-path" => {
            std::fs::OpenOptions::new().read(true).custom_flags(libc::O_PATH).open(arg(1)).map(drop)
        }
        // reopen-path PATH: an O_PATH handle to PATH, then a read through /proc/self/fd/N.
        "reopen-path" => reopen_path(arg(1)),
        // hold PATH: open PATH, print the fd number, wait to be killed.
        "hold" => File::open(arg(1)).and_then(hold),
        // hold-unix PATH: connect to the unix stream socket PATH, print the fd number, wait to
        // be killed.
        "hold-unix" => std::os::unix::net::UnixStream::connect(arg(1)).and_then(hold),
        // take PID FD: copy fd FD out of process PID (pidfd_getfd), then read through it (a
        // socket is only taken).
        "take" => take(arg(1).parse().unwrap_or(0), arg(2).parse().unwrap_or(-1)),
        // write PATH: open for writing and append a byte.
        "write" => std::fs::OpenOptions::new()
            .append(true)
            .open(arg(1))
            .and_then(|mut f| f.write_all(b"\n")),
        // creat PATH: the legacy creat(2) on PATH, which truncates it.
        "creat" => creat(arg(1)),
        // repeat PATH N: open+close PATH N times.
        "repeat" => repeat(arg(1), arg(2).parse().unwrap_or(1)),
        // environ PID: read /proc/PID/environ by a relative path.
        "environ" => {
            std::env::set_current_dir(format!("/proc/{}", arg(1))).and_then(|()| read("environ"))
        }
        // ptrace PID: attach, then detach.
        "ptrace" => ptrace_attach(arg(1).parse().unwrap_or(0)),
        // vm-readv PID ADDR: read a few bytes of PID's memory.
        "vm-readv" => vm_readv(arg(1).parse().unwrap_or(0)).map(drop),
        // vm-writev PID: read a few bytes of PID's memory, then write them back.
        "vm-writev" => vm_writev(arg(1).parse().unwrap_or(0)),
        // connect ADDR: TCP connect.
        "connect" => TcpStream::connect(arg(1)).map(drop),
        // connect-mapped ADDR: TCP connect from an IPv6 socket to the IPv4 ADDR, IPv4-mapped.
        "connect-mapped" => connect_mapped(arg(1)),
        // fastopen ADDR: TCP Fast Open: sendto(MSG_FASTOPEN) connects, no connect call.
        "fastopen" => fastopen(arg(1)),
        // unix PATH: connect to a unix stream socket.
        "unix" => std::os::unix::net::UnixStream::connect(arg(1)).map(drop),
        // udp ADDR: one UDP datagram.
        "udp" => UdpSocket::bind("127.0.0.1:0").and_then(|s| s.send_to(b"kw", arg(1)).map(drop)),
        // in-pid-namespace ACTION [ARGS…]: a new pid namespace with its own /proc, whose init
        // (pid 1 there; its host pid printed) runs this program's ACTION as pid 2.
        "in-pid-namespace" => in_pid_namespace(&args[1..]),
        // as-user UID PROGRAM [ARGS…]: drop to UID, then exec PROGRAM.
        "as-user" => as_user(arg(1).parse().unwrap_or(65534), &args[2..]),
        other => Err(std::io::Error::other(format!("unknown action {other:?}"))),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("kw-actor: {e}");
            ExitCode::FAILURE
        }
    }
}

fn read(path: &str) -> std::io::Result<()> {
    let mut buf = Vec::new();
    File::open(path)?.read_to_end(&mut buf).map(drop)
}

fn connect_mapped(addr: &str) -> std::io::Result<()> {
    let std::net::SocketAddr::V4(v4) = addr.parse().map_err(std::io::Error::other)? else {
        return Err(std::io::Error::other("an IPv4 address"));
    };
    let mapped = std::net::SocketAddrV6::new(v4.ip().to_ipv6_mapped(), v4.port(), 0, 0);
    TcpStream::connect(mapped).map(drop)
}

fn fastopen(addr: &str) -> std::io::Result<()> {
    use std::os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd};
    let std::net::SocketAddr::V4(v4) = addr.parse().map_err(std::io::Error::other)? else {
        return Err(std::io::Error::other("an IPv4 address"));
    };
    // SAFETY: a fresh socket, owned from here on.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    let sock = unsafe { OwnedFd::from_raw_fd(fd) };
    let sin = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: v4.port().to_be(),
        sin_addr: libc::in_addr { s_addr: u32::from(*v4.ip()).to_be() },
        sin_zero: [0; 8],
    };
    // SAFETY: a valid socket, buffer and address of the stated sizes.
    let n = unsafe {
        libc::sendto(
            sock.as_raw_fd(),
            b"kw".as_ptr().cast(),
            2,
            libc::MSG_FASTOPEN,
            (&raw const sin).cast(),
            size_of::<libc::sockaddr_in>() as libc::socklen_t,
        )
    };
    if n < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

fn reopen_path(path: &str) -> std::io::Result<()> {
    use std::os::fd::AsRawFd as _;
    let handle = std::fs::OpenOptions::new().read(true).custom_flags(libc::O_PATH).open(path)?;
    read(&format!("/proc/self/fd/{}", handle.as_raw_fd()))
}

fn overlay_read(dir: &str, name: &str) -> std::io::Result<()> {
    let check =
        |rc: libc::c_int| if rc == 0 { Ok(()) } else { Err(std::io::Error::last_os_error()) };
    let top = tempfile::tempdir()?;
    let (mnt, empty) = (top.path().join("mnt"), top.path().join("empty"));
    std::fs::create_dir(&mnt)?;
    std::fs::create_dir(&empty)?;
    let options = format!("lowerdir={dir}:{}", empty.display());
    let (target, options) = (c_path(mnt.to_str().unwrap_or_default())?, c_path(&options)?);
    // SAFETY: NUL-terminated strings alive across the calls; the namespace is this process's
    // own, so the mounts vanish with it.
    unsafe {
        check(libc::unshare(libc::CLONE_NEWNS))?;
        let private = libc::MS_REC | libc::MS_PRIVATE;
        check(libc::mount(
            std::ptr::null(),
            c"/".as_ptr(),
            std::ptr::null(),
            private,
            std::ptr::null(),
        ))?;
        check(libc::mount(
            c"overlay".as_ptr(),
            target.as_ptr(),
            c"overlay".as_ptr(),
            libc::MS_RDONLY,
            options.as_ptr().cast(),
        ))?;
    }
    read(mnt.join(name).to_str().unwrap_or_default())?;
    // SAFETY: the mount made above.
    check(unsafe { libc::umount(target.as_ptr()) })
}

fn from_memory(path: &str) -> std::io::Result<()> {
    use std::os::fd::{AsRawFd as _, FromRawFd as _};
    // SAFETY: NUL-terminated name; the result is checked.
    let fd = unsafe { libc::memfd_create(c"kw-fileless".as_ptr(), 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: a fresh descriptor owned here from now on.
    let mut memfd = unsafe { File::from_raw_fd(fd) };
    memfd.write_all(&std::fs::read("/proc/self/exe")?)?;
    let args =
        ["kw-fileless", "read", path].map(|a| CString::new(a).map_err(std::io::Error::other));
    let [a0, a1, a2] = args;
    let (a0, a1, a2) = (a0?, a1?, a2?);
    let argv = [a0.as_ptr(), a1.as_ptr(), a2.as_ptr(), std::ptr::null()];
    let envp = [std::ptr::null()];
    // SAFETY: NULL-terminated argv/envp of NUL-terminated strings alive across the call.
    unsafe { libc::fexecve(memfd.as_raw_fd(), argv.as_ptr(), envp.as_ptr()) };
    Err(std::io::Error::last_os_error())
}

/// `path` for a C call.
fn c_path(path: &str) -> std::io::Result<CString> {
    CString::new(Path::new(path).as_os_str().as_bytes()).map_err(std::io::Error::other)
}

/// creat(2): open for writing, truncating.
fn creat(path: &str) -> std::io::Result<()> {
    use std::os::fd::FromRawFd as _;
    let name = c_path(path)?;
    // SAFETY: a NUL-terminated path.
    let fd = unsafe { libc::creat(name.as_ptr(), 0o600) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: a fresh fd owned from here on.
    drop(unsafe { File::from_raw_fd(fd) });
    Ok(())
}

fn by_handle(path: &str) -> std::io::Result<()> {
    use std::os::fd::{AsRawFd as _, FromRawFd as _};
    let name = c_path(path)?;
    // struct file_handle followed by MAX_HANDLE_SZ (128) bytes, 8-aligned.
    let mut storage = [0u64; 1 + 128 / 8];
    let handle = storage.as_mut_ptr().cast::<libc::file_handle>();
    let mut mount_id = 0;
    // SAFETY: `handle` points at enough aligned room for MAX_HANDLE_SZ bytes of handle, and
    // `handle_bytes` says so; `name` is NUL-terminated.
    let rc = unsafe {
        (*handle).handle_bytes = 128;
        libc::name_to_handle_at(libc::AT_FDCWD, name.as_ptr(), handle, &mut mount_id, 0)
    };
    if rc < 0 {
        return Err(std::io::Error::last_os_error());
    }
    let parent = Path::new(path).parent().unwrap_or(Path::new("/"));
    let mount = File::open(parent)?;
    // SAFETY: the handle filled above; a valid directory fd on the same mount.
    let fd = unsafe { libc::open_by_handle_at(mount.as_raw_fd(), handle, libc::O_RDONLY) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    let mut buf = Vec::new();
    // SAFETY: a fresh fd owned from here on.
    unsafe { File::from_raw_fd(fd) }.read_to_end(&mut buf).map(drop)
}

/// Prints the descriptor number of `held` and keeps it until killed.
fn hold(held: impl std::os::fd::AsRawFd) -> std::io::Result<()> {
    println!("{}", held.as_raw_fd());
    std::io::stdout().flush()?;
    std::thread::sleep(std::time::Duration::from_secs(60));
    Ok(())
}

fn take(pid: i32, fd: i32) -> std::io::Result<()> {
    use std::os::fd::FromRawFd as _;
    // SAFETY: plain syscalls with integer arguments; results checked.
    let pidfd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if pidfd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: as above.
    let taken = unsafe { libc::syscall(libc::SYS_pidfd_getfd, pidfd as i32, fd, 0) };
    // SAFETY: pidfd came from pidfd_open and is closed once.
    unsafe { libc::close(pidfd as i32) };
    if taken < 0 {
        return Err(std::io::Error::last_os_error());
    }
    let mut buf = Vec::new();
    // SAFETY: a fresh fd owned from here on.
    let mut file = unsafe { File::from_raw_fd(taken as i32) };
    if std::os::unix::fs::FileTypeExt::is_socket(&file.metadata()?.file_type()) {
        return Ok(());
    }
    std::io::Seek::rewind(&mut file)?;
    file.read_to_end(&mut buf).map(drop)
}

/// Submits one io_uring request and waits for its result.
fn uring_run(ring: &mut io_uring::IoUring, entry: io_uring::squeue::Entry) -> std::io::Result<i32> {
    // SAFETY: the callers keep the entry's buffers alive until this returns.
    unsafe { ring.submission().push(&entry) }.map_err(std::io::Error::other)?;
    ring.submit_and_wait(1)?;
    let cqe = ring.completion().next().ok_or_else(|| std::io::Error::other("no completion"))?;
    if cqe.result() < 0 {
        return Err(std::io::Error::from_raw_os_error(-cqe.result()));
    }
    Ok(cqe.result())
}

fn uring_unix(path: &str) -> std::io::Result<()> {
    use io_uring::{IoUring, opcode, types};
    let mut ring = IoUring::new(4)?;
    // SAFETY: plain socket(2); the result is checked and closed below.
    let fd = unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: a zeroed sockaddr_un is valid; the path is copied in bounds below.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    let bytes = path.as_bytes();
    if bytes.len() >= addr.sun_path.len() {
        return Err(std::io::Error::other("socket path too long"));
    }
    for (d, s) in addr.sun_path.iter_mut().zip(bytes) {
        *d = *s as libc::c_char;
    }
    let len = std::mem::size_of::<libc::sockaddr_un>() as libc::socklen_t;
    let connect =
        opcode::Connect::new(types::Fd(fd), (&raw const addr).cast::<libc::sockaddr>(), len)
            .build();
    let result = uring_run(&mut ring, connect).map(drop);
    // SAFETY: fd came from socket() above and is closed once.
    unsafe { libc::close(fd) };
    result
}

fn uring_read(path: &str) -> std::io::Result<()> {
    use io_uring::{IoUring, opcode, types};
    let mut ring = IoUring::new(4)?;
    let mut run = |entry| uring_run(&mut ring, entry);
    let name = c_path(path)?;
    let open = opcode::OpenAt::new(types::Fd(libc::AT_FDCWD), name.as_ptr())
        .flags(libc::O_RDONLY | libc::O_CLOEXEC)
        .build();
    let fd = run(open)?;
    let mut buf = vec![0u8; 4096];
    let read = opcode::Read::new(types::Fd(fd), buf.as_mut_ptr(), buf.len() as u32).build();
    let result = run(read).map(drop);
    // SAFETY: fd came from the open above and is closed once.
    unsafe { libc::close(fd) };
    result
}

fn uring_read_fixed(path: &str, slot: &str) -> std::io::Result<()> {
    use io_uring::{IoUring, opcode, types};
    let mut ring = IoUring::new(4)?;
    ring.submitter().register_files_sparse(8)?;
    let wanted = match slot {
        "auto" => None,
        n => Some(n.parse::<u32>().map_err(std::io::Error::other)?),
    };
    let target = match wanted {
        None => types::DestinationSlot::auto_target(),
        Some(n) => types::DestinationSlot::try_from_slot_target(n)
            .map_err(|n| std::io::Error::other(format!("bad slot {n}")))?,
    };
    let name = c_path(path)?;
    // No O_CLOEXEC: the kernel refuses it for a fixed slot (there is no fd to close on exec).
    let open = opcode::OpenAt::new(types::Fd(libc::AT_FDCWD), name.as_ptr())
        .flags(libc::O_RDONLY)
        .file_index(Some(target))
        .build();
    let result = uring_run(&mut ring, open)?;
    // An automatic slot is the result; a chosen one yields 0.
    let index = wanted.unwrap_or(result as u32);
    let mut buf = vec![0u8; 4096];
    let read = opcode::Read::new(types::Fixed(index), buf.as_mut_ptr(), buf.len() as u32).build();
    uring_run(&mut ring, read).map(drop)
}

fn uring_batch_fixed(path: &str, install: bool) -> std::io::Result<()> {
    use io_uring::{IoUring, opcode, types};
    use std::os::fd::FromRawFd as _;
    let mut ring = IoUring::new(8)?;
    ring.submitter().register_files_sparse(4)?;
    // A cached name lets the open complete inline (a stat is no open), so the read after it
    // in the same submission finds the slot filled.
    std::fs::metadata(path)?;
    let name = c_path(path)?;
    let slot = types::DestinationSlot::try_from_slot_target(0)
        .map_err(|n| std::io::Error::other(format!("bad slot {n}")))?;
    let mut buf = vec![0u8; 4096];
    let entries = [
        opcode::OpenAt::new(types::Fd(libc::AT_FDCWD), name.as_ptr())
            .flags(libc::O_RDONLY)
            .file_index(Some(slot))
            .build()
            .user_data(1),
        if install {
            opcode::FixedFdInstall::new(types::Fixed(0), 0).build().user_data(2)
        } else {
            opcode::Read::new(types::Fixed(0), buf.as_mut_ptr(), buf.len() as u32)
                .build()
                .user_data(2)
        },
        opcode::Close::new(types::Fixed(0)).build().user_data(3),
    ];
    // SAFETY: the name and the buffer outlive the wait below.
    unsafe { ring.submission().push_multiple(&entries) }.map_err(std::io::Error::other)?;
    ring.submit_and_wait(entries.len())?;
    let mut installed = None;
    for cqe in ring.completion() {
        if cqe.result() < 0 {
            let error = std::io::Error::from_raw_os_error(-cqe.result());
            return Err(std::io::Error::other(format!("request {}: {error}", cqe.user_data())));
        }
        if install && cqe.user_data() == 2 {
            installed = Some(cqe.result());
        }
    }
    match installed {
        // SAFETY: the install's result is a new fd owned from here on.
        Some(fd) => unsafe { File::from_raw_fd(fd) }.read_to_end(&mut Vec::new()).map(drop),
        None if install => Err(std::io::Error::other("no fd installed")),
        None => Ok(()),
    }
}

fn repeat(path: &str, n: u64) -> std::io::Result<()> {
    for _ in 0..n {
        drop(File::open(path)?);
    }
    Ok(())
}

fn openat(dir: &str, name: &str) -> std::io::Result<()> {
    let dir = std::fs::OpenOptions::new().read(true).custom_flags(libc::O_DIRECTORY).open(dir)?;
    let name = c_path(name)?;
    use std::os::fd::AsRawFd as _;
    // SAFETY: valid fd and NUL-terminated name.
    let fd = unsafe { libc::openat(dir.as_raw_fd(), name.as_ptr(), libc::O_RDONLY) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: fd was just opened.
    unsafe { libc::close(fd) };
    Ok(())
}

fn in_pid_namespace(action: &[String]) -> std::io::Result<()> {
    let exe = std::env::current_exe()?;
    // SAFETY: plain syscalls; this program is single-threaded, so the forked child may run
    // anything.
    let init = unsafe {
        if libc::unshare(libc::CLONE_NEWPID | libc::CLONE_NEWNS) != 0 {
            return Err(std::io::Error::last_os_error());
        }
        libc::fork()
    };
    if init < 0 {
        return Err(std::io::Error::last_os_error());
    }
    if init == 0 {
        let code = match init_of_namespace(&exe, action) {
            Ok(true) => 0,
            Ok(false) => 1,
            Err(e) => {
                eprintln!("kw-actor: namespace init: {e}");
                2
            }
        };
        // SAFETY: leaving the forked child without running the parent's exit handlers.
        unsafe { libc::_exit(code) };
    }
    println!("{init}");
    std::io::stdout().flush()?;
    let mut status = 0;
    // SAFETY: waiting for the child forked above.
    unsafe { libc::waitpid(init, &mut status, 0) };
    if libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0 {
        Ok(())
    } else {
        Err(std::io::Error::other(format!("namespace init ended with status {status:#x}")))
    }
}

/// Pid 1 of a new namespace: mounts the namespace's own /proc (in a private mount namespace),
/// then runs `action` as its first child.
fn init_of_namespace(exe: &Path, action: &[String]) -> std::io::Result<bool> {
    // SAFETY: NUL-terminated strings; results checked.
    unsafe {
        let none = std::ptr::null();
        if libc::mount(none, c"/".as_ptr(), none, libc::MS_REC | libc::MS_PRIVATE, none.cast()) != 0
            || libc::mount(c"proc".as_ptr(), c"/proc".as_ptr(), c"proc".as_ptr(), 0, none.cast())
                != 0
        {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(Command::new(exe).args(action).status()?.success())
}

fn ptrace_attach(pid: i32) -> std::io::Result<()> {
    // SAFETY: plain syscalls on a pid given by the test.
    unsafe {
        if libc::ptrace(libc::PTRACE_ATTACH, pid, 0, 0) != 0 {
            return Err(std::io::Error::last_os_error());
        }
        let mut status = 0;
        libc::waitpid(pid, &mut status, 0);
        libc::ptrace(libc::PTRACE_DETACH, pid, 0, 0);
    }
    Ok(())
}

/// Reads the first bytes of `pid`'s stack area as listed in its maps; returns them and where.
fn vm_readv(pid: i32) -> std::io::Result<([u8; 16], usize)> {
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps"))?;
    let line = maps
        .lines()
        .find(|l| l.ends_with("[stack]"))
        .ok_or_else(|| std::io::Error::other("no stack"))?;
    let start = usize::from_str_radix(line.split('-').next().unwrap_or("0"), 16)
        .map_err(std::io::Error::other)?;
    let mut buf = [0u8; 16];
    let local = libc::iovec { iov_base: buf.as_mut_ptr().cast(), iov_len: buf.len() };
    let remote = libc::iovec { iov_base: start as *mut libc::c_void, iov_len: buf.len() };
    // SAFETY: one local buffer we own; the kernel checks the remote range.
    let n = unsafe { libc::process_vm_readv(pid, &local, 1, &remote, 1, 0) };
    if n < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok((buf, start))
}

/// Writes `pid`'s own bytes back where they were read: a real write that changes nothing.
fn vm_writev(pid: i32) -> std::io::Result<()> {
    let (mut buf, start) = vm_readv(pid)?;
    let local = libc::iovec { iov_base: buf.as_mut_ptr().cast(), iov_len: buf.len() };
    let remote = libc::iovec { iov_base: start as *mut libc::c_void, iov_len: buf.len() };
    // SAFETY: one local buffer we own; the kernel checks the remote range.
    let n = unsafe { libc::process_vm_writev(pid, &local, 1, &remote, 1, 0) };
    if n < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

fn as_user(uid: u32, program: &[String]) -> std::io::Result<()> {
    let (prog, rest) = program.split_first().ok_or_else(|| std::io::Error::other("no program"))?;
    // SAFETY: setgid/setuid before exec, in this single-threaded process.
    unsafe {
        if libc::setgid(uid) != 0 || libc::setuid(uid) != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Err(Command::new(prog).args(rest).exec())
}
