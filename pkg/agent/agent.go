//go:build linux

// Package agent is ambpf's node agent: it enrols pods (attaches the eBPF
// datapath in a pod's network namespace and hands the pod to the in-pod
// proxy over ZDS), remembers them in a small state file, and serves the
// enrolment API (pkg/agentapi) to the CNI plugin and ambpfctl.
//
// The datapath's pins in bpffs carry the capture; the agent's own state is
// only who the pods are. The agent can therefore stop and start at any time:
// on start it reconciles the state file with the pins, and a proxy that
// reconnects gets the whole set of pods as a ZDS snapshot.
package agent

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"sync"
	"sync/atomic"
	"time"

	"github.com/ambpf/ambpf/pkg/agentapi"
	"github.com/ambpf/ambpf/pkg/datapath"
	"github.com/ambpf/ambpf/pkg/fastpath"
	"github.com/ambpf/ambpf/pkg/netns"
	"github.com/ambpf/ambpf/pkg/probesnat"
	"github.com/ambpf/ambpf/pkg/zds"
)

// Defaults for Config's zero values.
const (
	DefaultStateDir  = "/var/lib/ambpf"
	DefaultReadyAddr = "127.0.0.1:15022"
	// ReadyOff disables the readiness HTTP endpoint.
	ReadyOff          = "off"
	defaultRetryMin   = 200 * time.Millisecond
	defaultRetryMax   = 10 * time.Second
	retryTick         = 100 * time.Millisecond
	shutdownGrace     = 2 * time.Second
	maxRequestBytes   = 64 << 10
	apiSocketDirPerms = 0o755
)

// Config configures an Agent. Zero values take the defaults.
type Config struct {
	// BPFRoot is the bpffs directory for the datapath's pins
	// (datapath.DefaultRoot).
	BPFRoot string
	// StateDir holds the state file (DefaultStateDir).
	StateDir string
	// ZDSPath is the ZDS socket the proxies connect to (zds.DefaultPath).
	ZDSPath string
	// APISocket is the enrolment API socket (agentapi.DefaultSocket).
	APISocket string
	// ReadyAddr is the TCP address serving GET /readyz (DefaultReadyAddr);
	// ReadyOff disables it.
	ReadyAddr string
	// Mode forces the datapath attach mode; zero detects it.
	Mode datapath.Mode
	// RetryMin and RetryMax bound the backoff of a pending pod's retries
	// (200 ms doubling to 10 s).
	RetryMin, RetryMax time.Duration
	// NetnsCheckInterval is how often every enrolled pod's netns path is
	// checked: a pod whose netns is gone (no CNI DEL came) is unenrolled
	// (DefaultNetnsCheck when zero; negative disables the check).
	NetnsCheckInterval time.Duration
	// ZDSTimeout is the per-operation deadline towards a proxy
	// (zds.DefaultTimeout).
	ZDSTimeout time.Duration
	// NoProbeSNAT disables the host-side kubelet probe SNAT
	// (pkg/probesnat). When enabled (the default), enrolling a pod
	// attaches it to the pod's host-side veth, so the node's own
	// connections to the pod (kubelet probes) arrive from 169.254.7.127
	// and reach the app uncaptured; an enrolment whose veth peer cannot
	// be found in NodeNetns fails.
	NoProbeSNAT bool
	// NodeNetns is the path of the network namespace holding the pods'
	// host-side veths (the node's); empty means the agent's own, as for
	// an agent on the host network.
	NodeNetns string
	// ZDSAllowUIDs are the uids a process connecting to the ZDS socket may
	// run as (root and the agent's own uid when empty). The socket itself
	// is mode 0600.
	ZDSAllowUIDs []int
	// ZDSProxyCgroup, when set, is the cgroup v2 directory (a path under
	// the cgroup2 mount, e.g. /kubepods.slice) a connecting proxy must run
	// in or below; any other process is refused even as root.
	ZDSProxyCgroup string
	// FastPath turns on the in-pod fast path (pkg/fastpath) in this mode
	// for every enrolled pod with a cgroup; "" or off leaves it off. A
	// kernel without it, or a pod it cannot be attached to, keeps the TCP
	// leg (logged, and shown by ambpfctl inspect).
	FastPath fastpath.Mode
	// FastPathOptIn makes the fast path opt-in: only pods whose request
	// says agentapi.FastPathEnabled (their ambpf.io/fastpath annotation)
	// get it. Otherwise every pod does but those that say
	// agentapi.FastPathDisabled. Without FastPath it does nothing.
	FastPathOptIn bool
	// Controller, when set, decides the API's enrolments, hears about
	// every change and rebuilds its pods before the agent is ready (the
	// Kubernetes mode: pkg/podwatch). Nil is the standalone mode.
	Controller Controller
	// Uninstalling, when set, is asked after a clean stop (Run's context
	// ended) whether the agent is being removed from the node rather than
	// restarted (in Kubernetes: its DaemonSet is deleted, helm
	// uninstall). When it answers true, Run unenrols every pod (each
	// keeps running, uncaptured) and removes the node-wide pins before it
	// returns. It must answer false when it cannot tell: pods then stay
	// captured (fail closed) for the next agent. Its context allows 10 s.
	Uninstalling func(ctx context.Context) bool `json:"-"`
	Logger       *slog.Logger
}

func (c *Config) setDefaults() {
	def := func(v *string, d string) {
		if *v == "" {
			*v = d
		}
	}
	def(&c.BPFRoot, datapath.DefaultRoot)
	def(&c.StateDir, DefaultStateDir)
	def(&c.ZDSPath, zds.DefaultPath)
	def(&c.APISocket, agentapi.DefaultSocket)
	def(&c.ReadyAddr, DefaultReadyAddr)
	if c.RetryMin <= 0 {
		c.RetryMin = defaultRetryMin
	}
	if c.RetryMax < c.RetryMin {
		c.RetryMax = max(defaultRetryMax, c.RetryMin)
	}
	if c.NetnsCheckInterval == 0 {
		c.NetnsCheckInterval = DefaultNetnsCheck
	}
	if c.ZDSTimeout <= 0 {
		c.ZDSTimeout = zds.DefaultTimeout
	}
	if c.Logger == nil {
		c.Logger = slog.Default()
	}
}

// Agent is the node agent. New prepares it, Run serves until its context
// ends. Stopping an Agent never detaches a pod: the pins keep capturing.
type Agent struct {
	cfg   Config
	log   *slog.Logger
	dp    *datapath.Loader
	state *stateFile
	// lostState is set when the state file was corrupt and set aside:
	// reconcile then keeps the pinned pods it does not know.
	lostState bool

	// podOps serialises the operations that change one pod (enrol,
	// unenrol, retries), which may wait seconds on a proxy, and lets
	// different pods' run in parallel; mu guards the fields below it and
	// is held only briefly, so status reads never wait on a proxy.
	podOps  podLocks
	mu      sync.Mutex
	pods    map[string]agentapi.PodState
	retries map[string]*backoff
	zds     *zds.Server
	// veths are the host-side veths given probe SNAT, by pod UID.
	veths map[string]hostVeth

	// fp is nil when the fast path is off or unavailable
	// (fpUnavailable says why); fpErrs are the pods it could not be
	// attached to, and why (guarded by mu).
	fp            *fastpath.Loader
	fpUnavailable string
	fpErrs        map[string]string

	// probes and nodeNS are nil when probe SNAT is disabled.
	probes *probesnat.Loader
	nodeNS *netns.NS

	ready   atomic.Bool
	running atomic.Bool
	kick    chan struct{}
}

// backoff is when a pending pod is retried next.
type backoff struct {
	next  time.Time
	delay time.Duration
}

// New opens the datapath loader, the state and (unless disabled) the probe
// SNAT loader in the node namespace. It attaches nothing and
// listens on nothing; Run does.
func New(cfg Config) (*Agent, error) {
	cfg.setDefaults()
	dp, err := datapath.New(datapath.Config{Root: cfg.BPFRoot, Mode: cfg.Mode, Logger: cfg.Logger})
	if err != nil {
		return nil, fmt.Errorf("datapath: %w", err)
	}
	st, err := openState(cfg.StateDir)
	if err != nil {
		return nil, err
	}
	pods, err := st.load()
	var corrupt *corruptStateError
	if errors.As(err, &corrupt) {
		cfg.Logger.Error("the state file is corrupt: starting from the pins; every pinned pod stays captured (fail closed) until it is enrolled again",
			"err", err)
	} else if err != nil {
		st.close()
		return nil, err
	}
	nodeNS, probes, err := openProbes(cfg)
	if err != nil {
		st.close()
		return nil, err
	}
	fp, fpErr := openFastPath(cfg)
	if fpErr != nil && !errors.Is(fpErr, fastpath.ErrUnsupported) {
		st.close()
		return nil, fpErr
	}
	var fpUnavailable string
	if fpErr != nil {
		fpUnavailable = fpErr.Error()
	}
	return &Agent{
		fp: fp, fpUnavailable: fpUnavailable, fpErrs: map[string]string{},
		lostState: corrupt != nil,
		cfg:       cfg, log: cfg.Logger, dp: dp, state: st,
		pods: pods, retries: map[string]*backoff{}, veths: map[string]hostVeth{}, kick: make(chan struct{}, 1),
		probes: probes, nodeNS: nodeNS,
	}, nil
}

// Ready reports whether the agent has reconciled its state with the pins
// (and, with a Controller, the controller has synced) and its ZDS server
// is serving.
func (a *Agent) Ready() bool { return a.ready.Load() }

// Run reconciles the state with the datapath, starts the ZDS server, the
// enrolment API and the readiness endpoint, then serves until ctx is done.
// It returns nil after a clean shutdown. Run may be called once; the Agent
// is unusable afterwards.
func (a *Agent) Run(ctx context.Context) (err error) {
	if !a.running.CompareAndSwap(false, true) {
		return errors.New("agent: Run called twice")
	}
	defer func() { err = errors.Join(err, a.state.close(), a.closeProbes()) }()
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()

	if err := a.reconcile(); err != nil {
		return err
	}
	srv, err := zds.NewServer(zds.ServerConfig{
		Path: a.cfg.ZDSPath, Snapshot: snapshotSource{a}, Logger: a.log, Timeout: a.cfg.ZDSTimeout,
		Admit: a.admitProxy,
	})
	if err != nil {
		return fmt.Errorf("zds server: %w", err)
	}
	a.mu.Lock()
	a.zds = srv
	a.mu.Unlock()

	var wg sync.WaitGroup
	errc := make(chan error, 4)
	wg.Add(1)
	go func() {
		defer wg.Done()
		a.retryLoop(ctx)
	}()

	servers, err := a.listen()
	if err != nil {
		cancel()
		srv.Close()
		wg.Wait()
		return err
	}
	for _, s := range servers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			if err := s.srv.Serve(s.ln); err != nil && !errors.Is(err, http.ErrServerClosed) {
				errc <- fmt.Errorf("serve %s: %w", s.ln.Addr(), err)
			}
		}()
	}
	// The controller rebuilds its pods before any proxy is served, so the
	// first snapshot already holds them: a proxy given a snapshot without
	// a pod tears that pod's connections down.
	synced := a.startController(ctx, &wg, errc)
	select {
	case <-synced:
	case <-ctx.Done():
	case err = <-errc:
	}
	if err == nil && ctx.Err() == nil {
		if a.cfg.Controller != nil {
			a.dropUnclaimed()
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			if err := srv.Serve(ctx); err != nil {
				errc <- fmt.Errorf("zds server: %w", err)
			}
		}()
		if iv := a.cfg.NetnsCheckInterval; iv > 0 {
			wg.Add(1)
			go func() {
				defer wg.Done()
				a.watchNetns(ctx, iv)
			}()
		}
		a.ready.Store(true)
		a.log.Info("agent ready", "api", a.cfg.APISocket, "zds", a.cfg.ZDSPath, "ready_addr", a.cfg.ReadyAddr,
			"features", a.dp.Features().String(), "pods", len(a.snapshotPods()))
		select {
		case <-ctx.Done():
		case err = <-errc:
		}
	}
	if err != nil {
		a.log.Error("agent stopping on error", "err", err)
	}
	a.ready.Store(false)
	sctx, scancel := context.WithTimeout(context.Background(), shutdownGrace)
	defer scancel()
	for _, s := range servers {
		if serr := s.srv.Shutdown(sctx); serr != nil {
			s.srv.Close()
		}
	}
	os.Remove(a.cfg.APISocket)
	cancel()
	srv.Close()
	wg.Wait()
	if err == nil && a.uninstalling() {
		return a.uninstall()
	}
	a.log.Info("agent stopped; pods stay captured through their pins")
	return err
}

// startController runs the controller, if any, and returns a channel
// closed once it has synced (at once without a controller).
func (a *Agent) startController(ctx context.Context, wg *sync.WaitGroup, errc chan<- error) <-chan struct{} {
	synced := make(chan struct{})
	c := a.cfg.Controller
	if c == nil {
		close(synced)
		return synced
	}
	var once sync.Once
	wg.Add(1)
	go func() {
		defer wg.Done()
		err := c.Run(ctx, a, func() { once.Do(func() { close(synced) }) })
		if err != nil && ctx.Err() == nil {
			errc <- fmt.Errorf("controller: %w", err)
		}
	}()
	return synced
}

type httpServer struct {
	srv *http.Server
	ln  net.Listener
}

// listen opens the API socket and the readiness address.
func (a *Agent) listen() ([]httpServer, error) {
	apiLn, err := listenUnix(a.cfg.APISocket)
	if err != nil {
		return nil, err
	}
	out := []httpServer{{srv: &http.Server{Handler: a.apiHandler(), ReadHeaderTimeout: 10 * time.Second}, ln: apiLn}}
	if a.cfg.ReadyAddr != ReadyOff {
		ln, err := net.Listen("tcp", a.cfg.ReadyAddr)
		if err != nil {
			apiLn.Close()
			return nil, fmt.Errorf("listen readiness %s: %w", a.cfg.ReadyAddr, err)
		}
		out = append(out, httpServer{srv: &http.Server{Handler: a.readyHandler(), ReadHeaderTimeout: 10 * time.Second}, ln: ln})
	}
	return out, nil
}

// listenUnix listens on path, replacing a stale socket file but refusing
// to steal the socket of a live agent.
func listenUnix(path string) (net.Listener, error) {
	if err := os.MkdirAll(filepath.Dir(path), apiSocketDirPerms); err != nil {
		return nil, fmt.Errorf("create socket dir: %w", err)
	}
	if fi, err := os.Lstat(path); err == nil {
		if fi.Mode()&os.ModeSocket == 0 {
			return nil, fmt.Errorf("listen %s: the path exists and is not a socket", path)
		}
		if c, err := net.DialTimeout("unix", path, time.Second); err == nil {
			c.Close()
			return nil, fmt.Errorf("listen %s: another agent is serving this socket", path)
		}
		if err := os.Remove(path); err != nil {
			return nil, fmt.Errorf("remove stale socket %s: %w", path, err)
		}
	}
	ln, err := net.Listen("unix", path)
	if err != nil {
		return nil, fmt.Errorf("listen %s: %w", path, err)
	}
	// Only root may enrol pods. (Not through umask: it is process-wide and
	// would race with every other file this process creates.)
	if err := os.Chmod(path, 0o600); err != nil {
		ln.Close()
		return nil, fmt.Errorf("chmod %s: %w", path, err)
	}
	ln.(*net.UnixListener).SetUnlinkOnClose(true)
	return ln, nil
}

// readyHandler serves /readyz: 200 once reconciled and listening.
func (a *Agent) readyHandler() http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("GET /readyz", func(w http.ResponseWriter, _ *http.Request) {
		if !a.Ready() {
			http.Error(w, "not ready", http.StatusServiceUnavailable)
			return
		}
		fmt.Fprintln(w, "ready")
	})
	return mux
}

// podLog returns the logger for lines about one pod.
func (a *Agent) podLog(p agentapi.PodState) *slog.Logger {
	return a.log.With("uid", p.UID, "pod", p.Namespace+"/"+p.Name)
}
