//go:build linux

package zds

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"maps"
	"os"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/ambpf/ambpf/pkg/netns"
)

// Handler is what the proxy does with the agent's requests. The Client
// calls it from a single goroutine, one call at a time, and acks only when
// the call returns: each call must finish well within the agent's ack
// deadline (5 s).
type Handler interface {
	// AddWorkload starts the pod proxy for uid inside netns. netns is
	// valid only during the call and stays owned by the client: duplicate
	// it to keep it. On error nothing of the pod may be left running; the
	// error text is sent as the nack and the client retries the Add every
	// RetryInterval while the connection stays up.
	AddWorkload(uid string, info WorkloadInfo, netns *os.File) error
	// KeepWorkload says, during a snapshot, that the agent knows uid but
	// cannot open its netns: a running pod proxy for it must be kept.
	KeepWorkload(uid string)
	// DelWorkload stops the pod proxy for uid. It is called only for a
	// uid whose AddWorkload succeeded. The client forgets the pod even
	// when it returns an error, so it must release what it can.
	DelWorkload(uid string) error
	// Reconcile ends a snapshot: stop every pod proxy whose uid is not in
	// keep. keep must not be retained.
	Reconcile(keep map[string]bool)
}

// Forgetter is an optional extension of Handler. ForgetWorkload is called
// when the client gives up a failed Add for good: the agent deleted the
// pod, or a snapshot no longer names it. A handler that keeps something of
// pods that failed to start (their addresses, so that they stay mesh
// workloads and fail closed) drops it there. It is not called on a
// disconnect: the next snapshot sends the pod again or reconciles it away.
type Forgetter interface {
	ForgetWorkload(uid string)
}

// ClientConfig configures a Client. Zero values take the defaults.
type ClientConfig struct {
	Path    string       // socket path; DefaultPath when empty
	Handler Handler      // required
	Logger  *slog.Logger // slog.Default() when nil
	// Timeout is the deadline for each write (hello, acks); DefaultTimeout
	// when zero.
	Timeout time.Duration
	// RetryInterval is how often failed Adds are retried; DefaultTimeout
	// when zero.
	RetryInterval time.Duration
	// BusyRetryInterval is how often an Add that failed because a port
	// is in use (EADDRINUSE) is retried instead; DefaultBusyRetry when
	// zero. That is another proxy holding the pod's listeners, as during
	// a rolling upgrade on a kernel where two proxies cannot share them
	// (before 6.6, no SO_REUSEPORT): the pod is this proxy's as soon as
	// the other one closes them, so the gap is at most this interval.
	// Such a pending Add does not make the client unready: the proxy is
	// ready to take the pod over, and the rollout must go on to stop the
	// old proxy.
	BusyRetryInterval time.Duration
	// MinBackoff and MaxBackoff bound the reconnect delay, which doubles
	// from MinBackoff after every failed attempt; 10 ms and 15 s when zero.
	MinBackoff, MaxBackoff time.Duration
}

// Client is the proxy end: it connects to the agent, says hello and
// drives a Handler. Its view of the running pods survives reconnects, so a
// new snapshot is reconciled against it.
type Client struct {
	cfg ClientConfig
	log *slog.Logger

	// Only Run's goroutine touches these; Ready reads ready.
	running   map[string]netns.ID // uid -> netns of a started pod proxy
	pending   map[string]*pendingAdd
	nextRetry time.Time
	ready     atomic.Bool
	// synced is set once the current connection's snapshot is reconciled
	// and cleared when that connection ends: only then does the handler
	// know every pod the agent enrols.
	synced signal

	noReconnect chan struct{} // closed by StopReconnecting
	stopOnce    sync.Once
}

// pendingAdd is an Add whose AddWorkload failed, kept for retry; it owns
// ns. busy is set when the last attempt failed with EADDRINUSE.
type pendingAdd struct {
	info WorkloadInfo
	ns   *netns.NS
	id   netns.ID
	busy bool
}

// DefaultBusyRetry is ClientConfig.BusyRetryInterval's default.
const DefaultBusyRetry = 100 * time.Millisecond

// session is the per-connection protocol state.
type session struct {
	keep         map[string]bool // uids named in the snapshot so far
	snapshotDone bool
}

// NewClient returns a client; Run connects it.
func NewClient(cfg ClientConfig) (*Client, error) {
	if cfg.Handler == nil {
		return nil, errors.New("zds client: no handler")
	}
	if cfg.Path == "" {
		cfg.Path = DefaultPath
	}
	if cfg.Timeout <= 0 {
		cfg.Timeout = DefaultTimeout
	}
	if cfg.RetryInterval <= 0 {
		cfg.RetryInterval = DefaultTimeout
	}
	if cfg.BusyRetryInterval <= 0 {
		cfg.BusyRetryInterval = DefaultBusyRetry
	}
	if cfg.MinBackoff <= 0 {
		cfg.MinBackoff = 10 * time.Millisecond
	}
	if cfg.MaxBackoff <= 0 {
		cfg.MaxBackoff = 15 * time.Second
	}
	log := cfg.Logger
	if log == nil {
		log = slog.Default()
	}
	return &Client{
		cfg:     cfg,
		log:     log.With("component", "zds-client"),
		running: map[string]netns.ID{},
		pending: map[string]*pendingAdd{},

		noReconnect: make(chan struct{}),
	}, nil
}

// Ready reports whether the current connection's snapshot has been
// received and no pod is waiting for a retried Add, other than one whose
// ports another proxy holds (BusyRetryInterval). It is false while the
// agent is away and, after a reconnect, until the new snapshot ends (as
// ztunnel's readiness).
func (c *Client) Ready() bool { return c.ready.Load() }

// Synced reports whether the handler has been given the whole snapshot of
// the current connection: every pod the agent enrols has been added (or
// kept, or failed and is pending). False before the first connection,
// between connections and during a snapshot.
func (c *Client) Synced() bool { return c.synced.isSet() }

// WaitSynced blocks until Synced is true or ctx is done (it then returns
// ctx's error).
func (c *Client) WaitSynced(ctx context.Context) error { return c.synced.wait(ctx) }

// Run connects, serves the connection and reconnects with backoff until
// ctx is done (it then returns nil) or the agent breaks the protocol (it
// returns the *ProtocolError; running pod proxies are left alone). Run
// must not be called concurrently with itself.
func (c *Client) Run(ctx context.Context) error {
	defer c.dropPending()
	backoff := c.cfg.MinBackoff
	for {
		conn, err := Dial(ctx, c.cfg.Path)
		if err == nil {
			var progressed bool
			progressed, err = c.serve(ctx, conn)
			conn.Close()
			// The next snapshot sends these pods again.
			c.dropPending()
			var perr *ProtocolError
			if errors.As(err, &perr) {
				c.log.Error("agent broke the protocol; stopping", "err", err)
				return err
			}
			if progressed {
				backoff = c.cfg.MinBackoff
			}
		}
		if ctx.Err() != nil {
			return nil
		}
		if !c.reconnecting() {
			c.log.Info("zds connection ended; not reconnecting (draining)", "err", err)
			return nil
		}
		c.log.Info("zds connection ended; reconnecting", "err", err, "backoff", backoff)
		t := time.NewTimer(backoff)
		select {
		case <-ctx.Done():
			t.Stop()
			return nil
		case <-c.noReconnect:
			t.Stop()
			return nil
		case <-t.C:
		}
		backoff = min(2*backoff, c.cfg.MaxBackoff)
	}
}

// serve runs one connection until it fails; progressed reports whether
// the agent sent anything, which resets the reconnect backoff.
func (c *Client) serve(ctx context.Context, conn *Conn) (progressed bool, err error) {
	stop := context.AfterFunc(ctx, func() { conn.Close() })
	defer stop()
	// Whatever the agent enrols from now on is unknown until it says so
	// again in the next connection's snapshot.
	defer func() {
		c.synced.clear()
		c.publish()
	}()
	if err := conn.Send(Hello{Version: V1}.Marshal(), nil, c.deadline()); err != nil {
		return false, fmt.Errorf("send hello: %w", err)
	}
	c.log.Info("connected to agent", "path", c.cfg.Path)
	s := &session{keep: map[string]bool{}}
	for {
		var wait time.Time
		if len(c.pending) > 0 {
			wait = c.nextRetry
		}
		msg, fds, err := conn.Recv(wait)
		var reason string
		var perr error
		switch {
		case err == nil:
			progressed = true
			reason, perr = c.handle(s, msg, fds)
		case errors.Is(err, os.ErrDeadlineExceeded) && !wait.IsZero():
			c.retryPending()
			continue
		case errors.Is(err, ErrTruncated):
			// Datagram boundaries survive a truncation, so the stream is
			// still in step: refuse this request and go on.
			progressed = true
			reason = err.Error()
		default:
			return progressed, err
		}
		c.publish()
		if reason != "" {
			c.log.Warn("nacking request", "reason", reason)
			reason = boundNack(reason)
		}
		if err := conn.Send(WorkloadResponse{Ack: &Ack{Error: reason}}.Marshal(), nil, c.deadline()); err != nil {
			return progressed, fmt.Errorf("send ack: %w", err)
		}
		if perr != nil {
			return progressed, perr
		}
	}
}

// handle applies one request. It returns the nack reason ("" to ack) and,
// for a request the protocol forbids here, a *ProtocolError. It owns fds.
func (c *Client) handle(s *session, msg []byte, fds []*os.File) (reason string, perr error) {
	var req WorkloadRequest
	if err := req.Unmarshal(msg); err != nil {
		closeAll(fds)
		return fmt.Sprintf("malformed request: %v", err), nil
	}
	add, isAdd := req.Payload.(*AddWorkload)
	if isAdd {
		return c.add(s, add, fds)
	}
	if len(fds) > 0 {
		closeAll(fds)
		return fmt.Sprintf("%s carried %d file descriptors", opName(req.Payload), len(fds)), nil
	}
	switch p := req.Payload.(type) {
	case *KeepWorkload:
		if s.snapshotDone {
			return protocolError("keep %s after snapshot", p.UID)
		}
		s.keep[p.UID] = true
		c.cfg.Handler.KeepWorkload(p.UID)
	case *SnapshotSent:
		if s.snapshotDone {
			return protocolError("second snapshot_sent")
		}
		c.reconcile(s.keep)
		s.snapshotDone = true
	case *DelWorkload:
		return c.del(s, p.UID), nil
	}
	return "", nil
}

func protocolError(format string, args ...any) (string, error) {
	reason := fmt.Sprintf(format, args...)
	return reason, &ProtocolError{Reason: reason}
}

// add starts, replaces or keeps the pod proxy for an AddWorkload.
func (c *Client) add(s *session, p *AddWorkload, fds []*os.File) (string, error) {
	if p.WorkloadInfo == nil {
		closeAll(fds)
		return protocolError("add %s without workload_info", p.UID)
	}
	if len(fds) != 1 {
		closeAll(fds)
		return fmt.Sprintf("add %s: want 1 netns fd, got %d", p.UID, len(fds)), nil
	}
	ns, err := netns.FromFd(int(fds[0].Fd()))
	fds[0].Close()
	if err != nil {
		return fmt.Sprintf("add %s: %v", p.UID, err), nil
	}
	id, err := ns.ID()
	if err != nil {
		ns.Close()
		return fmt.Sprintf("add %s: %v", p.UID, err), nil
	}
	if !s.snapshotDone {
		s.keep[p.UID] = true
	}
	c.forgetPending(p.UID)
	if cur, ok := c.running[p.UID]; ok {
		if cur == id {
			ns.Close()
			return "", nil
		}
		c.log.Info("pod netns changed; replacing its proxy", "uid", p.UID)
		if err := c.cfg.Handler.DelWorkload(p.UID); err != nil {
			c.log.Warn("stopping replaced pod proxy", "uid", p.UID, "err", err)
		}
		delete(c.running, p.UID)
	}
	pa := &pendingAdd{info: *p.WorkloadInfo, ns: ns, id: id}
	if err := c.start(p.UID, pa); err != nil {
		at := time.Now().Add(c.retryInterval(pa))
		if len(c.pending) == 0 || at.Before(c.nextRetry) {
			c.nextRetry = at
		}
		c.pending[p.UID] = pa
		return err.Error(), nil
	}
	return "", nil
}

// retryInterval is when a pending Add is tried again.
func (c *Client) retryInterval(pa *pendingAdd) time.Duration {
	if pa.busy {
		return c.cfg.BusyRetryInterval
	}
	return c.cfg.RetryInterval
}

// start calls AddWorkload; on success the pod is running and pa.ns is
// closed, on failure the caller keeps pa (with busy updated).
func (c *Client) start(uid string, pa *pendingAdd) error {
	if err := c.cfg.Handler.AddWorkload(uid, pa.info, pa.ns.File()); err != nil {
		wasBusy := pa.busy
		pa.busy = errors.Is(err, syscall.EADDRINUSE)
		if pa.busy && wasBusy {
			// Every BusyRetryInterval until the other proxy lets go.
			c.log.Debug("pod proxy failed to start", "uid", uid, "err", err)
		} else {
			c.log.Warn("pod proxy failed to start", "uid", uid, "err", err, "port_in_use", pa.busy)
		}
		return err
	}
	c.running[uid] = pa.id
	pa.ns.Close()
	c.log.Info("pod proxy started", "uid", uid)
	return nil
}

// retryPending retries every failed Add once.
func (c *Client) retryPending() {
	next := c.cfg.RetryInterval
	for uid, pa := range c.pending {
		if c.start(uid, pa) == nil {
			delete(c.pending, uid)
			continue
		}
		next = min(next, c.retryInterval(pa))
	}
	c.nextRetry = time.Now().Add(next)
	c.publish()
}

func (c *Client) del(s *session, uid string) string {
	delete(s.keep, uid)
	if _, ok := c.pending[uid]; ok {
		c.forgetPending(uid)
		c.forget(uid)
	}
	if _, ok := c.running[uid]; !ok {
		return ""
	}
	delete(c.running, uid)
	if err := c.cfg.Handler.DelWorkload(uid); err != nil {
		return err.Error()
	}
	c.log.Info("pod proxy stopped", "uid", uid)
	return ""
}

// reconcile ends a snapshot: pods not named in it are torn down.
func (c *Client) reconcile(keep map[string]bool) {
	c.cfg.Handler.Reconcile(maps.Clone(keep))
	for uid := range c.running {
		if !keep[uid] {
			delete(c.running, uid)
		}
	}
	for uid := range c.pending {
		if !keep[uid] {
			c.forgetPending(uid)
			c.forget(uid)
		}
	}
	c.synced.set()
	c.log.Info("snapshot reconciled", "pods", len(keep))
}

// forget tells a Forgetter handler that a failed Add is given up.
func (c *Client) forget(uid string) {
	if f, ok := c.cfg.Handler.(Forgetter); ok {
		f.ForgetWorkload(uid)
	}
}

func (c *Client) forgetPending(uid string) {
	if pa, ok := c.pending[uid]; ok {
		pa.ns.Close()
		delete(c.pending, uid)
	}
}

func (c *Client) dropPending() {
	for uid := range c.pending {
		c.forgetPending(uid)
	}
	c.publish()
}

// publish sets Ready: synced, and no pod waiting for anything but
// another proxy's ports (see ClientConfig.BusyRetryInterval).
func (c *Client) publish() {
	ready := c.synced.isSet()
	for _, pa := range c.pending {
		ready = ready && pa.busy
	}
	c.ready.Store(ready)
}

func (c *Client) deadline() time.Time { return time.Now().Add(c.cfg.Timeout) }

// StopReconnecting makes Run return nil when the current connection ends
// instead of connecting again (or at once when it is between
// connections). A draining proxy calls it: it must not come back as the
// agent's newest connection and be handed pods it will not serve.
func (c *Client) StopReconnecting() {
	c.stopOnce.Do(func() { close(c.noReconnect) })
}

func (c *Client) reconnecting() bool {
	select {
	case <-c.noReconnect:
		return false
	default:
		return true
	}
}
