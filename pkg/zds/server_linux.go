//go:build linux

package zds

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"sync"
	"time"

	"golang.org/x/sys/unix"
)

// Pod is one enrolled pod as the agent knows it, for a snapshot.
type Pod struct {
	UID  string
	Info WorkloadInfo
	// OpenNetns opens the pod's network namespace; the server closes the
	// file after sending it. nil, or an error, means the agent cannot
	// open it: the pod is then sent as KeepWorkload.
	OpenNetns func() (*os.File, error)
}

// SnapshotSource gives the pods to send to a proxy that just connected.
type SnapshotSource interface {
	Snapshot(ctx context.Context) ([]Pod, error)
}

// ServerConfig configures a Server. Zero values take the defaults.
type ServerConfig struct {
	Path     string         // socket path; DefaultPath when empty
	Snapshot SnapshotSource // required
	Logger   *slog.Logger   // slog.Default() when nil
	// Timeout is the deadline for each write, ack wait and hello wait;
	// DefaultTimeout when zero.
	Timeout time.Duration
	// ProbeInterval is how often an idle connection is checked for a
	// vanished peer; DefaultTimeout when zero.
	ProbeInterval time.Duration
	// Admit, when set, is called with the kernel's credentials of each
	// connecting proxy (SO_PEERCRED) before anything is read from it; an
	// error refuses the connection. The agent checks there who may be a
	// proxy and trusts the proxy's cgroup before it hears of any pod.
	Admit func(Peer) error
	// Gone, when set, is called once for each admitted connection when it
	// ends.
	Gone func(Peer)
	// PathCheckInterval is how often Serve checks that the socket path
	// still names its socket; DefaultPathCheckInterval when zero.
	PathCheckInterval time.Duration
}

// DefaultPathCheckInterval is how often the server checks its socket path.
const DefaultPathCheckInterval = time.Second

// Peer is who connected, as the kernel saw it at connect(2).
type Peer struct {
	PID, UID, GID int
}

// Server is the node-agent end: it listens for proxies, sends each a
// snapshot, then Add (to the newest connection) and Del (to all).
type Server struct {
	cfg ServerConfig
	log *slog.Logger
	ln  *net.UnixListener
	ino uint64 // the socket file's inode, so Close removes only its own

	mu     sync.Mutex
	conns  []*serverConn // connections that said hello, oldest first
	nextID uint64
	closed bool
	wg     sync.WaitGroup
}

// serverConn is one proxy connection; its goroutine owns c and is the
// only one to read or write it.
type serverConn struct {
	id     uint64
	c      *Conn
	calls  chan *call
	done   chan struct{} // closed when the goroutine stops serving calls
	synced bool          // snapshot sent and acked; guarded by Server.mu
}

// call is one request handed to a connection's goroutine. fd, when set,
// is owned by the call and closed once sent.
type call struct {
	req WorkloadRequest
	fd  *os.File
	res chan error // buffered: the goroutine never blocks on a gone caller
}

// Status is a point-in-time view of the server for status output.
type Status struct {
	Connections int // proxies that said hello and are still connected
	Synced      int // of those, the ones that acked the whole snapshot
}

// NewServer creates the parent directory if needed and listens at the
// path with mode 0600, replacing a stale socket file. Serve must then be
// called.
func NewServer(cfg ServerConfig) (*Server, error) {
	if cfg.Snapshot == nil {
		return nil, errors.New("zds server: no snapshot source")
	}
	if cfg.Path == "" {
		cfg.Path = DefaultPath
	}
	if cfg.Timeout <= 0 {
		cfg.Timeout = DefaultTimeout
	}
	if cfg.ProbeInterval <= 0 {
		cfg.ProbeInterval = DefaultTimeout
	}
	if cfg.PathCheckInterval <= 0 {
		cfg.PathCheckInterval = DefaultPathCheckInterval
	}
	log := cfg.Logger
	if log == nil {
		log = slog.Default()
	}
	if err := os.MkdirAll(filepath.Dir(cfg.Path), 0o755); err != nil {
		return nil, fmt.Errorf("zds server: %w", err)
	}
	// A socket file left by a previous agent is replaced by the rename in
	// listenPrivate: there is no moment without a socket at the path.
	ln, ino, err := listenPrivate(cfg.Path)
	if err != nil {
		return nil, fmt.Errorf("zds server: %w", err)
	}
	return &Server{cfg: cfg, log: log.With("component", "zds-server"), ln: ln, ino: ino}, nil
}

// listenPrivate listens on a unix socket at path that only its owner (root)
// may connect to, whatever the umask: it binds under a temporary name,
// sets mode 0600, and renames it into place, so the path never names a
// socket others could reach. It returns the socket file's inode.
func listenPrivate(path string) (*net.UnixListener, uint64, error) {
	tmp := fmt.Sprintf("%s.%d.tmp", path, os.Getpid())
	os.Remove(tmp)
	ln, err := net.ListenUnix("unixpacket", &net.UnixAddr{Name: tmp, Net: "unixpacket"})
	if err != nil {
		return nil, 0, fmt.Errorf("listen %s: %w", path, err)
	}
	// Close must not unlink whatever the path names by then: a newer
	// agent may have replaced it.
	ln.SetUnlinkOnClose(false)
	var st unix.Stat_t
	err = os.Chmod(tmp, 0o600)
	if err == nil {
		err = unix.Stat(tmp, &st)
	}
	if err == nil {
		err = os.Rename(tmp, path)
	}
	if err != nil {
		ln.Close()
		os.Remove(tmp)
		return nil, 0, fmt.Errorf("listen %s: %w", path, err)
	}
	return ln, st.Ino, nil
}

// Path returns the socket path the server listens on.
func (s *Server) Path() string { return s.cfg.Path }

// Serve accepts proxies until ctx is done or Close is called, then closes
// every connection, waits for their goroutines and returns nil. It
// returns an error only when accepting fails for another reason.
func (s *Server) Serve(ctx context.Context) error {
	stop := context.AfterFunc(ctx, func() { s.Close() })
	defer stop()
	connCtx, cancel := context.WithCancel(ctx)
	defer func() {
		cancel()
		s.wg.Wait()
	}()
	s.wg.Go(func() { s.guardPath(connCtx) })
	for {
		ln := s.listener()
		uc, err := ln.AcceptUnix()
		if err != nil {
			if s.isClosed() {
				return nil
			}
			if ln != s.listener() {
				continue // guardPath listens again
			}
			s.Close()
			return fmt.Errorf("zds server: accept: %w", err)
		}
		s.wg.Add(1)
		go func() {
			defer s.wg.Done()
			s.serveConn(connCtx, &Conn{uc: uc})
		}()
	}
}

func (s *Server) listener() *net.UnixListener {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.ln
}

// guardPath checks every PathCheckInterval that the socket path still
// names this server's socket. When it was removed (a node cleanup, a
// mistaken rm) or replaced by another socket, no proxy could connect any
// more, or proxies would connect to whoever made it: the server listens
// at the path again (listenPrivate's rename takes it back) and closes the
// old listener. Connected proxies are not affected.
func (s *Server) guardPath(ctx context.Context) {
	tick := time.NewTicker(s.cfg.PathCheckInterval)
	defer tick.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-tick.C:
		}
		var st unix.Stat_t
		err := unix.Stat(s.cfg.Path, &st)
		s.mu.Lock()
		ok := err == nil && st.Ino == s.ino && st.Mode&unix.S_IFMT == unix.S_IFSOCK
		s.mu.Unlock()
		if ok {
			continue
		}
		ln, ino, lerr := listenPrivate(s.cfg.Path)
		if lerr != nil {
			s.log.Error("the zds socket path was removed or replaced, and listening there again failed", "path", s.cfg.Path, "err", lerr)
			continue
		}
		s.mu.Lock()
		if s.closed {
			s.mu.Unlock()
			ln.Close()
			return
		}
		old := s.ln
		s.ln, s.ino = ln, ino
		s.mu.Unlock()
		old.Close()
		s.log.Warn("the zds socket path was removed or replaced; listening there again", "path", s.cfg.Path, "stat_err", err)
	}
}

// Close stops listening and removes the socket file. Connections are
// closed by Serve as it returns.
func (s *Server) Close() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed {
		return nil
	}
	s.closed = true
	var st unix.Stat_t
	if unix.Stat(s.cfg.Path, &st) == nil && st.Ino == s.ino {
		os.Remove(s.cfg.Path)
	}
	return s.ln.Close()
}

func (s *Server) isClosed() bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.closed
}

// Status returns the connection counts.
func (s *Server) Status() Status {
	s.mu.Lock()
	defer s.mu.Unlock()
	st := Status{Connections: len(s.conns)}
	for _, sc := range s.conns {
		if sc.synced {
			st.Synced++
		}
	}
	return st
}

// Ready reports whether at least one proxy has acked a whole snapshot.
func (s *Server) Ready() bool { return s.Status().Synced > 0 }

// Add sends AddWorkload with the pod's netns to the newest connection
// and returns its ack: nil, a *NackError, or a transport error. It
// returns ErrNoConnection when no proxy is connected; the pod then goes
// out in the next proxy's snapshot. The caller keeps netns. A request to
// a connection still sending its snapshot waits until the snapshot is done.
// Put the pod in the SnapshotSource before calling Add, so that a proxy
// connecting meanwhile gets it in its snapshot.
func (s *Server) Add(ctx context.Context, uid string, info WorkloadInfo, netns *os.File) error {
	s.mu.Lock()
	var sc *serverConn
	if n := len(s.conns); n > 0 {
		sc = s.conns[n-1]
	}
	s.mu.Unlock()
	if sc == nil {
		return fmt.Errorf("zds add %s: %w", uid, ErrNoConnection)
	}
	// The call owns a duplicate so the caller may close netns at any time,
	// even after giving up on ctx while the request is still being sent.
	fd, err := dupFile(netns)
	if err != nil {
		return fmt.Errorf("zds add %s: %w", uid, err)
	}
	return sc.do(ctx, &call{req: WorkloadRequest{Payload: &AddWorkload{UID: uid, WorkloadInfo: &info}}, fd: fd})
}

// Del sends DelWorkload to every connection and returns the joined
// errors (each a *NackError or a transport error). With no proxy
// connected there is nothing to delete and it returns nil.
func (s *Server) Del(ctx context.Context, uid string) error {
	s.mu.Lock()
	conns := append([]*serverConn(nil), s.conns...)
	s.mu.Unlock()
	errs := make([]error, len(conns))
	var wg sync.WaitGroup
	for i, sc := range conns {
		wg.Go(func() {
			errs[i] = sc.do(ctx, &call{req: WorkloadRequest{Payload: &DelWorkload{UID: uid}}})
		})
	}
	wg.Wait()
	return errors.Join(errs...)
}

// do hands c to the connection's goroutine and waits for its ack.
func (sc *serverConn) do(ctx context.Context, c *call) error {
	c.res = make(chan error, 1)
	select {
	case sc.calls <- c:
	case <-sc.done:
		closeFile(c.fd)
		return fmt.Errorf("zds %s %s: %w", opName(c.req.Payload), payloadUID(c.req.Payload), ErrConnClosed)
	case <-ctx.Done():
		closeFile(c.fd)
		return ctx.Err()
	}
	select {
	case err := <-c.res:
		return err
	case <-ctx.Done():
		return ctx.Err()
	}
}

// serveConn runs one connection: hello, snapshot, then calls until the
// peer goes, a request fails in transport, or ctx is done.
func (s *Server) serveConn(ctx context.Context, c *Conn) {
	stop := context.AfterFunc(ctx, func() { c.Close() })
	defer stop()
	defer c.Close()

	peer, err := c.peer()
	if err == nil && s.cfg.Admit != nil {
		err = s.cfg.Admit(peer)
	}
	if err != nil {
		s.log.Warn("refusing proxy connection", "pid", peer.PID, "uid", peer.UID, "err", err)
		return
	}
	if s.cfg.Gone != nil {
		defer s.cfg.Gone(peer)
	}
	if err := s.readHello(c); err != nil {
		s.log.Warn("rejecting proxy connection", "err", err)
		return
	}
	sc := s.register(c)
	log := s.log.With("conn", sc.id, "pid", peer.PID)
	log.Info("proxy connected")
	defer func() {
		// calls is unbuffered, so once done is closed no call can be
		// left behind: senders see done instead.
		s.unregister(sc)
		log.Info("proxy disconnected")
	}()

	if err := s.sendSnapshot(ctx, sc, log); err != nil {
		log.Warn("snapshot failed; dropping connection", "err", err)
		return
	}
	s.mu.Lock()
	sc.synced = true
	s.mu.Unlock()
	log.Info("snapshot acked")

	probe := time.NewTicker(s.cfg.ProbeInterval)
	defer probe.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case cl := <-sc.calls:
			err := s.roundTrip(sc, cl.req, cl.fd)
			closeFile(cl.fd)
			cl.res <- err
			var nack *NackError
			if err != nil && !errors.As(err, &nack) {
				// A write or ack that failed or timed out leaves the
				// stream in an unknown state: a late ack would be taken
				// for the next request's.
				log.Warn("request failed; dropping connection", "err", err)
				return
			}
		case <-probe.C:
			if !s.peerAlive(sc, log) {
				return
			}
		}
	}
}

// readHello waits for the proxy's ZdsHello and accepts V1 only.
func (s *Server) readHello(c *Conn) error {
	msg, fds, err := c.Recv(time.Now().Add(s.cfg.Timeout))
	if err != nil {
		return fmt.Errorf("read hello: %w", err)
	}
	closeAll(fds)
	if len(fds) > 0 {
		return errors.New("hello carried file descriptors")
	}
	var h Hello
	if err := h.Unmarshal(msg); err != nil {
		return fmt.Errorf("decode hello: %w", err)
	}
	if h.Version != V1 {
		return fmt.Errorf("unsupported hello version %d", h.Version)
	}
	return nil
}

func (s *Server) register(c *Conn) *serverConn {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.nextID++
	sc := &serverConn{id: s.nextID, c: c, calls: make(chan *call), done: make(chan struct{})}
	s.conns = append(s.conns, sc)
	return sc
}

func (s *Server) unregister(sc *serverConn) {
	s.mu.Lock()
	defer s.mu.Unlock()
	for i, x := range s.conns {
		if x == sc {
			s.conns = append(s.conns[:i], s.conns[i+1:]...)
			break
		}
	}
	close(sc.done)
}

// sendSnapshot sends every pod, one at a time, then SnapshotSent. A nack
// is logged and the snapshot goes on (the proxy retries a pod that failed
// to start); a transport error ends it.
func (s *Server) sendSnapshot(ctx context.Context, sc *serverConn, log *slog.Logger) error {
	pods, err := s.cfg.Snapshot.Snapshot(ctx)
	if err != nil {
		return fmt.Errorf("get snapshot: %w", err)
	}
	for _, p := range pods {
		req, fd := s.snapshotRequest(p, log)
		err := s.roundTrip(sc, req, fd)
		closeFile(fd)
		if err := s.nackOrFatal(err, log); err != nil {
			return err
		}
	}
	return s.nackOrFatal(s.roundTrip(sc, WorkloadRequest{Payload: &SnapshotSent{}}, nil), log)
}

// snapshotRequest is Add with the pod's netns when it can be opened, Keep
// otherwise.
func (s *Server) snapshotRequest(p Pod, log *slog.Logger) (WorkloadRequest, *os.File) {
	if p.OpenNetns != nil {
		f, err := p.OpenNetns()
		if err == nil {
			info := p.Info
			return WorkloadRequest{Payload: &AddWorkload{UID: p.UID, WorkloadInfo: &info}}, f
		}
		log.Warn("cannot open pod netns; sending keep", "uid", p.UID, "err", err)
	}
	return WorkloadRequest{Payload: &KeepWorkload{UID: p.UID}}, nil
}

// nackOrFatal logs a nack and swallows it; other errors are returned.
func (s *Server) nackOrFatal(err error, log *slog.Logger) error {
	var nack *NackError
	if errors.As(err, &nack) {
		log.Warn("proxy nacked snapshot request", "err", err)
		return nil
	}
	return err
}

// roundTrip sends one request and waits for its ack, each within the
// timeout. It returns nil, a *NackError or a transport error.
func (s *Server) roundTrip(sc *serverConn, req WorkloadRequest, fd *os.File) error {
	op, uid := opName(req.Payload), payloadUID(req.Payload)
	b, err := req.Marshal()
	if err != nil {
		return err
	}
	if err := sc.c.Send(b, fd, time.Now().Add(s.cfg.Timeout)); err != nil {
		return fmt.Errorf("zds %s %s: %w", op, uid, err)
	}
	msg, fds, err := sc.c.Recv(time.Now().Add(s.cfg.Timeout))
	if err != nil {
		return fmt.Errorf("zds %s %s: wait for ack: %w", op, uid, err)
	}
	closeAll(fds)
	if len(fds) > 0 {
		return fmt.Errorf("zds %s %s: ack carried file descriptors", op, uid)
	}
	var resp WorkloadResponse
	if err := resp.Unmarshal(msg); err != nil {
		return fmt.Errorf("zds %s %s: %w", op, uid, err)
	}
	if resp.Ack.Error != "" {
		return &NackError{Op: op, UID: uid, Reason: resp.Ack.Error}
	}
	return nil
}

// peerAlive checks an idle connection. A message the proxy sent without
// being asked is read and dropped so that it is not taken for the next
// ack.
func (s *Server) peerAlive(sc *serverConn, log *slog.Logger) bool {
	closed, pending, err := sc.c.peerClosed()
	if closed || err != nil {
		log.Info("proxy went away", "err", err)
		return false
	}
	if pending {
		msg, fds, err := sc.c.Recv(time.Now().Add(s.cfg.Timeout))
		closeAll(fds)
		if err != nil {
			log.Info("proxy went away", "err", err)
			return false
		}
		log.Warn("dropping unsolicited message from proxy", "bytes", len(msg), "fds", len(fds))
	}
	return true
}

// dupFile duplicates f's descriptor (close-on-exec) into a new file.
func dupFile(f *os.File) (*os.File, error) {
	if f == nil {
		return nil, errors.New("no netns file")
	}
	rc, err := f.SyscallConn()
	if err != nil {
		return nil, fmt.Errorf("dup %s: %w", f.Name(), err)
	}
	var nfd int
	var derr error
	if err := rc.Control(func(fd uintptr) {
		nfd, derr = unix.FcntlInt(fd, unix.F_DUPFD_CLOEXEC, 0)
	}); err != nil {
		return nil, fmt.Errorf("dup %s: %w", f.Name(), err)
	}
	if derr != nil {
		return nil, fmt.Errorf("dup %s: %w", f.Name(), derr)
	}
	return os.NewFile(uintptr(nfd), f.Name()), nil
}

func closeFile(f *os.File) {
	if f != nil {
		f.Close()
	}
}
