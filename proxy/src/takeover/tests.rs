use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::mpsc;

use super::*;

fn temp_socket(name: &str) -> PathBuf {
    std::env::temp_dir().join(format!("skiff-handover-{name}-{}.sock", std::process::id()))
}

#[test]
fn records_round_trip_and_garbage_is_refused() {
    for r in [
        Record::Hello(VERSION),
        Record::socket(Role::Capture, "127.0.0.1:15001".into()),
        Record::socket(Role::PinLock, "/sys/fs/bpf/skiff/7".into()),
        Record::End(3),
        Record::Drain,
        Record::Draining,
        Record::Err("version 2 is not 1".into()),
    ] {
        assert_eq!(Record::decode(&r.encode()), Ok(r));
    }
    assert!(Record::decode(b"").is_err());
    assert!(Record::decode(&[1, b'X', 0, 0, 0, 1, 0, 0, 0]).is_err());
    assert!(Record::decode(&[2, 99]).is_err());
    assert!(Record::decode(&[3, 1, 0]).is_err());
    assert!(Record::decode(&[42]).is_err());
}

#[test]
fn default_socket_is_named_after_the_pin_directory() {
    assert_eq!(
        default_socket(Path::new("/sys/fs/bpf/skiff/4242")),
        Some(PathBuf::from("/run/skiff/4242.sock"))
    );
}

/// A successor receives every listening socket (several per address), serves on the same
/// listen queue (a connection queued before the handover is accepted by the successor), and
/// its DRAIN reaches the predecessor, which frees the socket path.
#[test]
fn sockets_move_to_a_successor_with_their_listen_queue() {
    let path = temp_socket("move");
    let old = Sockets::new();
    let a = old
        .listen(Role::Capture, "127.0.0.1:0".parse().unwrap(), || {
            Ok(vec![TcpListener::bind("127.0.0.1:0")?])
        })
        .unwrap();
    let addr_a = a[0].local_addr().unwrap();
    // Registered under the address asked for: rebind it under its real one as a bind site
    // with a fixed address would.
    old.forget("127.0.0.1:0".parse().unwrap());
    let a = old.listen(Role::Capture, addr_a, || Ok(a)).unwrap();
    let b: Vec<TcpListener> = (0..2)
        .map(|_| TcpListener::bind("127.0.0.1:0").unwrap())
        .collect();
    let addr_b = b[0].local_addr().unwrap();
    let b = old.listen(Role::Listener, addr_b, || Ok(b)).unwrap();
    assert_eq!(b.len(), 2);

    let (tx, rx) = mpsc::channel();
    let handle = serve(&path, old.clone(), move || tx.send(()).unwrap()).unwrap();
    // Queued while only the predecessor listens.
    let mut early = TcpStream::connect(addr_a).unwrap();

    let (new, pred) = receive(&path).unwrap();
    let taken = new
        .listen(Role::Capture, addr_a, || panic!("must not bind: inherited"))
        .unwrap();
    assert_eq!(taken.len(), 1);
    let taken_b = new
        .listen(Role::Listener, addr_b, || {
            panic!("must not bind: inherited")
        })
        .unwrap();
    assert_eq!(taken_b.len(), 2);
    assert!(new.drop_unused().is_empty());
    // The predecessor stops accepting and closes its own fds: the queue survives.
    drop(a);
    drop(b);
    drop(old);
    let (mut s, _) = taken[0].accept().unwrap();
    early.write_all(b"hi").unwrap();
    let mut got = [0u8; 2];
    s.read_exact(&mut got).unwrap();
    assert_eq!(&got, b"hi");

    pred.drain().unwrap();
    rx.recv_timeout(Duration::from_secs(5)).unwrap();
    assert!(
        !path.exists(),
        "the predecessor unlinks its handover socket"
    );
    handle.remove();
}

#[test]
fn a_peer_of_another_version_is_refused() {
    let path = temp_socket("version");
    let sockets = Sockets::new();
    let _l = sockets
        .listen(Role::Admin, "127.0.0.1:1".parse().unwrap(), || {
            Ok(vec![TcpListener::bind("127.0.0.1:0")?])
        })
        .unwrap();
    let handle = serve(&path, sockets, || panic!("no drain")).unwrap();
    let conn = seqpacket().unwrap();
    connect(conn.as_raw_fd(), &UnixAddr::new(&path).unwrap()).unwrap();
    proto::send(&conn, &Record::Hello(VERSION + 1), None).unwrap();
    let (r, fd) = proto::recv(&conn).unwrap();
    assert!(
        matches!(r, Record::Err(ref m) if m.contains("version")),
        "{r:?}"
    );
    assert!(fd.is_none());
    // The refused peer got no socket; a correct one still does.
    let (new, pred) = receive(&path).unwrap();
    let addr: SocketAddr = "127.0.0.1:1".parse().unwrap();
    assert_eq!(new.lock().inherited.get(&addr).map(Vec::len), Some(1));
    drop(pred);
    handle.remove();
    assert!(!path.exists());
}

#[test]
fn a_stale_socket_file_is_replaced_and_a_live_one_is_not() {
    let path = temp_socket("stale");
    // A socket file nobody accepts on (a killed skiff's).
    let stale = seqpacket().unwrap();
    bind(stale.as_raw_fd(), &UnixAddr::new(&path).unwrap()).unwrap();
    drop(stale);
    let h = serve(&path, Sockets::new(), || {}).unwrap();
    let err = serve(&path, Sockets::new(), || {}).unwrap_err();
    assert!(err.to_string().contains("binding"), "{err}");
    h.remove();
    assert!(!path.exists());
}
