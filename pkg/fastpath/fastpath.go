//go:build linux

// Package fastpath loads and attaches the in-pod fast path (bpf/fastpath.c):
// sockops programs that record an app's connected sockets and the proxy's
// accepted sockets that are their peers, and an sk_msg program that moves
// each sendmsg of one straight into the other's receive queue, so the
// app <-> proxy leg inside a pod skips the TCP stack.
//
// The programs and maps are the node's, pinned under <root>/fastpath/ next
// to the datapath's pins (root is the datapath's root):
//
//	<root>/fastpath/fp_socks            the recorded sockets (SOCKHASH, key struct fp_key), fastpath_msg attached
//	<root>/fastpath/fp_meta             role, pod and state of each (HASH, same key)
//	<root>/fastpath/fp_stats            counters by pod index (ARRAY)
//	<root>/fastpath/fp_build            which build the programs are (ARRAY, 1 entry)
//	<root>/fastpath/prog_msg            fastpath_msg
//	<root>/fastpath/prog_proxy          fastpath_proxy
//	<root>/fastpath/proxies/<cgroup id> the proxy program's link on a proxy cgroup
//	<root>/fastpath/pods/<uid>/link_sockops_<index>_<mode>  the pod's fastpath_app link on its cgroup
//
// A pod's fastpath_app is loaded with the pod's datapath index (the same
// index as in <root>/node/pod_counters), so counters of both are found the
// same way. Pins are the state: any process sees what is attached.
package fastpath

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"os"
	"path/filepath"
	"strconv"
	"strings"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/asm"
	"github.com/cilium/ebpf/features"
	"github.com/cilium/ebpf/link"
	"github.com/cilium/ebpf/rlimit"

	"github.com/ambpf/ambpf/pkg/bpffs"
	"github.com/ambpf/ambpf/pkg/bpfobj"
	"github.com/ambpf/ambpf/pkg/cgroup"
	"github.com/ambpf/ambpf/pkg/dpstate"
	"github.com/ambpf/ambpf/pkg/tcattach"
)

// Dir is the fast path's directory under the datapath root.
const Dir = "fastpath"

const (
	pinSocks    = "fp_socks"
	pinMeta     = "fp_meta"
	pinStats    = "fp_stats"
	pinBuild    = "fp_build"
	pinProgMsg  = "prog_msg"
	pinProgPxy  = "prog_proxy"
	proxiesDir  = "proxies"
	podsDir     = "pods"
	linkPrefix  = "link_sockops_"
	maxPodIndex = 1024   // DEFAULT_MAX_PODS: fp_stats' size
	fpNoIngress = 1 << 1 // FP_NO_INGRESS
)

// Errors a caller can test for with errors.Is.
var (
	// ErrUnsupported: the kernel lacks what the fast path needs
	// (bpf_get_netns_cookie in sockops and sk_msg: 5.15).
	ErrUnsupported = errors.New("kernel does not support the fast path")
	ErrNotAttached = errors.New("fast path not attached")
)

// Counters are a pod's fast path counters (struct fp_counters); the type
// is pkg/dpstate's, so the agent's clients need not link this package.
type Counters = dpstate.FastPathCounters

// Mode says which of the in-pod leg's directions skip TCP.
type Mode string

const (
	// Off: no fast path; the pod's bytes take TCP both ways.
	Off Mode = "off"
	// ToProxy redirects only what the app sends into the proxy's socket.
	// The app's receive side is untouched, so this is safe for every app;
	// the proxy must read its in-pod sockets with recvmsg, not splice(2)
	// (ambpf-proxy does with --fastpath).
	ToProxy Mode = "to-proxy"
	// Both also redirects the proxy's bytes into the app's socket, which
	// changes what the app's receive side sees on the kernels measured
	// (docs/KERNELS.md): splice(2) from the socket misses redirected bytes
	// and SO_RCVLOWAT is not honoured. Only for apps known not to rely on
	// either.
	Both Mode = "both"
)

// ParseMode parses a Mode ("" is Off).
func ParseMode(s string) (Mode, error) {
	switch m := Mode(s); m {
	case "", Off:
		return Off, nil
	case ToProxy, Both:
		return m, nil
	}
	return "", fmt.Errorf("fast path mode %q: want off, to-proxy or both", s)
}

// Status is a pod's fast path as read from its pins.
type Status = dpstate.FastPath

// Config configures a Loader.
type Config struct {
	// Root is the datapath's bpffs root (datapath.DefaultRoot when empty).
	Root   string
	Logger *slog.Logger
}

// Loader attaches the fast path. Its methods are safe for concurrent use
// and across processes (mutations hold an flock on <root>/fastpath).
type Loader struct {
	dir  string
	log  *slog.Logger
	spec *ebpf.CollectionSpec
}

// Supported reports whether this kernel can run the fast path; the error
// says what is missing.
func Supported() error {
	if err := features.HaveProgramHelper(ebpf.SockOps, asm.FnGetNetnsCookie); err != nil {
		return fmt.Errorf("%w: sockops without bpf_get_netns_cookie (5.15+): %w", ErrUnsupported, err)
	}
	if err := features.HaveProgramHelper(ebpf.SkMsg, asm.FnGetNetnsCookie); err != nil {
		return fmt.Errorf("%w: sk_msg without bpf_get_netns_cookie (5.15+): %w", ErrUnsupported, err)
	}
	if err := features.HaveMapType(ebpf.SockHash); err != nil {
		return fmt.Errorf("%w: no sockhash: %w", ErrUnsupported, err)
	}
	return nil
}

// New prepares a Loader; it loads nothing until the first attach.
func New(cfg Config) (*Loader, error) {
	root := cfg.Root
	if root == "" {
		root = "/sys/fs/bpf/ambpf"
	}
	log := cfg.Logger
	if log == nil {
		log = slog.Default()
	}
	if err := Supported(); err != nil {
		return nil, err
	}
	if err := rlimit.RemoveMemlock(); err != nil {
		return nil, fmt.Errorf("remove memlock limit: %w", err)
	}
	if err := bpffs.Check(root); err != nil {
		return nil, err
	}
	dir := filepath.Join(root, Dir)
	for _, d := range []string{dir, filepath.Join(dir, proxiesDir), filepath.Join(dir, podsDir)} {
		if err := os.MkdirAll(d, 0o700); err != nil {
			return nil, fmt.Errorf("create %s: %w", d, err)
		}
	}
	spec, err := loadFastpath()
	if err != nil {
		return nil, fmt.Errorf("load embedded fast path programs: %w", err)
	}
	return &Loader{dir: dir, log: log, spec: spec}, nil
}

func (l *Loader) pin(name string) string { return filepath.Join(l.dir, name) }

// node holds the node's loaded objects while a mutation runs.
type node struct {
	socks, meta, stats, build *ebpf.Map
	msg, proxy                *ebpf.Program
}

func (n *node) Close() {
	for _, c := range []interface{ Close() error }{n.socks, n.meta, n.stats, n.build, n.msg, n.proxy} {
		if c != nil {
			c.Close()
		}
	}
}

// loadNode opens the node's pinned objects, or loads, attaches and pins
// them when absent, or swaps the programs for this build's when the
// pinned ones are another build's (maps kept: live connections keep
// their redirects). The caller holds the lock.
func (l *Loader) loadNode() (*node, error) {
	var n node
	socks, err := ebpf.LoadPinnedMap(l.pin(pinSocks), nil)
	if err == nil {
		n.socks = socks
		if n.meta, err = ebpf.LoadPinnedMap(l.pin(pinMeta), nil); err == nil {
			if n.stats, err = ebpf.LoadPinnedMap(l.pin(pinStats), nil); err == nil {
				n.build, err = ebpf.LoadPinnedMap(l.pin(pinBuild), nil)
			}
		}
		if err != nil {
			n.Close()
			return nil, fmt.Errorf("open fast path maps: %w", err)
		}
	}
	if n.socks != nil {
		var built uint64
		msg, err1 := ebpf.LoadPinnedProgram(l.pin(pinProgMsg), nil)
		pxy, err2 := ebpf.LoadPinnedProgram(l.pin(pinProgPxy), nil)
		if err1 == nil && err2 == nil && n.build.Lookup(uint32(0), &built) == nil && built == l.build() {
			n.msg, n.proxy = msg, pxy
			return &n, nil
		}
		for _, p := range []*ebpf.Program{msg, pxy} {
			if p != nil {
				p.Close()
			}
		}
	}
	var objs fastpathObjects
	opts := &ebpf.CollectionOptions{}
	if n.socks != nil {
		opts.MapReplacements = map[string]*ebpf.Map{pinSocks: n.socks, pinMeta: n.meta, pinStats: n.stats, pinBuild: n.build}
	}
	if err := bpfobj.Load(l.spec, &objs, opts, "fast path"); err != nil {
		n.Close()
		return nil, err
	}
	defer objs.FastpathApp.Close() // loaded per pod, with its index
	upgrade := n.socks != nil
	if !upgrade {
		n.socks, n.meta, n.stats, n.build = objs.FpSocks, objs.FpMeta, objs.FpStats, objs.FpBuild
	}
	n.msg, n.proxy = objs.FastpathMsg, objs.FastpathProxy
	// Attaching to the map replaces a program already there atomically.
	if err := link.RawAttachProgram(link.RawAttachProgramOptions{Target: n.socks.FD(), Program: n.msg, Attach: ebpf.AttachSkMsgVerdict}); err != nil {
		n.Close()
		return nil, fmt.Errorf("attach fast path sk_msg program to fp_socks: %w", err)
	}
	if upgrade {
		if err := l.updateProxyLinks(n.proxy); err != nil {
			n.Close()
			return nil, err
		}
	}
	pins := []struct {
		name string
		obj  interface{ Pin(string) error }
	}{{pinSocks, n.socks}, {pinMeta, n.meta}, {pinStats, n.stats}, {pinBuild, n.build}, {pinProgMsg, n.msg}, {pinProgPxy, n.proxy}}
	for _, p := range pins {
		if upgrade && p.obj != any(n.msg) && p.obj != any(n.proxy) {
			continue // maps are reused as they are
		}
		if err := bpffs.PinReplacing(p.obj, l.pin(p.name)); err != nil {
			n.Close()
			return nil, fmt.Errorf("pin fast path %s: %w", p.name, err)
		}
	}
	if err := n.build.Put(uint32(0), l.build()); err != nil {
		n.Close()
		return nil, fmt.Errorf("record fast path build: %w", err)
	}
	l.log.Info("fast path programs loaded", "dir", l.dir, "upgrade", upgrade)
	return &n, nil
}

// build names this build of the object (bpfobj.Tag), as fp_build records it.
func (l *Loader) build() uint64 {
	t := bpfobj.Tag(_FastpathBytes)
	return binary.LittleEndian.Uint64(t[:])
}

// updateProxyLinks moves every proxy cgroup link to prog.
func (l *Loader) updateProxyLinks(prog *ebpf.Program) error {
	ents, err := os.ReadDir(filepath.Join(l.dir, proxiesDir))
	if err != nil {
		return fmt.Errorf("list fast path proxy links: %w", err)
	}
	for _, e := range ents {
		if err := bpffs.UpdatePinnedLink(filepath.Join(l.dir, proxiesDir, e.Name()), prog); err != nil {
			return fmt.Errorf("upgrade fast path proxy link: %w", err)
		}
	}
	return nil
}

func (l *Loader) lock() (func(), error) { return bpffs.Lock(l.dir) }

// Verify loads the node's programs if absent and swaps pinned programs of
// another build for this build's (the agent runs it on start). The maps
// are kept, so connections already redirected stay so.
func (l *Loader) Verify() error {
	unlock, err := l.lock()
	if err != nil {
		return err
	}
	defer unlock()
	n, err := l.loadNode()
	if err != nil {
		return err
	}
	n.Close()
	return nil
}

// AttachProxy attaches the proxy's program to the proxy's cgroup, so its
// accepted sockets whose peer is an app socket of an attached pod are
// recorded. Idempotent. The root cgroup is refused: every process of the
// machine would count as the proxy.
func (l *Loader) AttachProxy(cgroupDir string) error {
	id, err := cgroup.ID(cgroupDir)
	if err != nil {
		return fmt.Errorf("fast path proxy cgroup: %w", err)
	}
	if mnt, err := cgroup.Mount(); err == nil {
		if rid, err := cgroup.ID(mnt); err == nil && rid == id {
			return fmt.Errorf("fast path: refusing the root cgroup %s as the proxy's", cgroupDir)
		}
	}
	unlock, err := l.lock()
	if err != nil {
		return err
	}
	defer unlock()
	pin := filepath.Join(l.dir, proxiesDir, strconv.FormatUint(id, 10))
	if tcattach.PinnedLinkState(pin).Attached {
		return nil
	}
	os.Remove(pin) // a link whose cgroup went away
	n, err := l.loadNode()
	if err != nil {
		return err
	}
	defer n.Close()
	lk, err := link.AttachCgroup(link.CgroupOptions{Path: cgroupDir, Attach: ebpf.AttachCGroupSockOps, Program: n.proxy})
	if err != nil {
		return fmt.Errorf("attach fast path to proxy cgroup %s: %w", cgroupDir, err)
	}
	defer lk.Close()
	if err := lk.Pin(pin); err != nil {
		lk.Detach()
		return fmt.Errorf("pin fast path proxy link: %w", err)
	}
	l.log.Info("fast path attached to proxy cgroup", "cgroup", cgroupDir, "id", id)
	return nil
}

// DetachProxy removes the proxy program from the cgroup with id (pinned
// connections keep working: a recorded socket stays recorded until it
// closes).
func (l *Loader) DetachProxy(id uint64) error {
	unlock, err := l.lock()
	if err != nil {
		return err
	}
	defer unlock()
	return l.detachPin(filepath.Join(l.dir, proxiesDir, strconv.FormatUint(id, 10)))
}

// Proxies lists the cgroup ids the proxy program is attached to.
func (l *Loader) Proxies() ([]uint64, error) {
	ents, err := os.ReadDir(filepath.Join(l.dir, proxiesDir))
	if err != nil {
		return nil, fmt.Errorf("list fast path proxies: %w", err)
	}
	var ids []uint64
	for _, e := range ents {
		if id, err := strconv.ParseUint(e.Name(), 10, 64); err == nil {
			ids = append(ids, id)
		}
	}
	return ids, nil
}

func (l *Loader) detachPin(pin string) error {
	if _, err := os.Stat(pin); errors.Is(err, fs.ErrNotExist) {
		return nil
	}
	if err := tcattach.DetachPinned(pin); err != nil {
		return err
	}
	if err := os.Remove(pin); err != nil {
		return fmt.Errorf("unpin %s: %w", pin, err)
	}
	return nil
}

// AttachPod attaches the app program for pod uid, whose datapath index is
// index, to the pod's cgroup, in mode (ToProxy or Both); its counters
// start at zero. Idempotent for the same index and mode. A pod cgroup inside a proxy cgroup is refused (the
// proxy's program would see the pod's sockets as the proxy's).
func (l *Loader) AttachPod(uid string, index uint32, cgroupDir string, mode Mode) error {
	if mode != ToProxy && mode != Both {
		return fmt.Errorf("fast path %s: cannot attach in mode %q", uid, mode)
	}
	if index >= maxPodIndex {
		return fmt.Errorf("fast path %s: pod index %d beyond %d", uid, index, maxPodIndex)
	}
	if uid == "" || strings.ContainsAny(uid, "/.") {
		return fmt.Errorf("fast path: invalid pod uid %q", uid)
	}
	if err := l.checkNotInProxy(cgroupDir); err != nil {
		return err
	}
	unlock, err := l.lock()
	if err != nil {
		return err
	}
	defer unlock()
	dir := filepath.Join(l.dir, podsDir, uid)
	pin := filepath.Join(dir, linkPrefix+strconv.FormatUint(uint64(index), 10)+"_"+string(mode))
	if tcattach.PinnedLinkState(pin).Attached {
		return nil
	}
	if err := l.detachPod(dir); err != nil { // another index, or a stale pin
		return err
	}
	n, err := l.loadNode()
	if err != nil {
		return err
	}
	defer n.Close()
	spec := l.spec.Copy()
	flags := uint32(fpNoIngress)
	if mode == Both {
		flags = 0
	}
	if err := spec.Variables["pod_index"].Set(index); err != nil {
		return fmt.Errorf("fast path %s: set pod index: %w", uid, err)
	}
	if err := spec.Variables["app_flags"].Set(flags); err != nil {
		return fmt.Errorf("fast path %s: set flags: %w", uid, err)
	}
	var objs struct {
		App *ebpf.Program `ebpf:"fastpath_app"`
	}
	if err := bpfobj.Load(spec, &objs, &ebpf.CollectionOptions{MapReplacements: map[string]*ebpf.Map{pinSocks: n.socks, pinMeta: n.meta, pinStats: n.stats, pinBuild: n.build}}, "fast path"); err != nil {
		return err
	}
	defer objs.App.Close()
	if err := n.stats.Put(index, fastpathFpCounters{}); err != nil {
		return fmt.Errorf("fast path %s: reset counters: %w", uid, err)
	}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return fmt.Errorf("fast path %s: %w", uid, err)
	}
	lk, err := link.AttachCgroup(link.CgroupOptions{Path: cgroupDir, Attach: ebpf.AttachCGroupSockOps, Program: objs.App})
	if err != nil {
		os.Remove(dir)
		return fmt.Errorf("attach fast path %s to cgroup %s: %w", uid, cgroupDir, err)
	}
	defer lk.Close()
	if err := lk.Pin(pin); err != nil {
		lk.Detach()
		os.Remove(dir)
		return fmt.Errorf("pin fast path %s link: %w", uid, err)
	}
	l.log.Info("fast path attached", "pod", uid, "index", index, "mode", mode, "cgroup", cgroupDir)
	return nil
}

// checkNotInProxy refuses a pod cgroup at or below a proxy cgroup.
func (l *Loader) checkNotInProxy(podCgroup string) error {
	ids, err := l.Proxies()
	if err != nil {
		return err
	}
	for dir := filepath.Clean(podCgroup); ; dir = filepath.Dir(dir) {
		if id, err := cgroup.ID(dir); err == nil {
			for _, p := range ids {
				if p == id {
					return fmt.Errorf("fast path: pod cgroup %s is inside proxy cgroup %s", podCgroup, dir)
				}
			}
		} else if dir != podCgroup {
			return nil // above the cgroup2 mount
		} else {
			return fmt.Errorf("fast path pod cgroup: %w", err)
		}
		if filepath.Dir(dir) == dir {
			return nil
		}
	}
}

// DetachPod removes pod uid's program (a no-op when none is attached).
// Its connections already redirected keep working until they close.
func (l *Loader) DetachPod(uid string) error {
	unlock, err := l.lock()
	if err != nil {
		return err
	}
	defer unlock()
	return l.detachPod(filepath.Join(l.dir, podsDir, uid))
}

func (l *Loader) detachPod(dir string) error {
	ents, err := os.ReadDir(dir)
	if errors.Is(err, fs.ErrNotExist) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("fast path: %w", err)
	}
	for _, e := range ents {
		if err := l.detachPin(filepath.Join(dir, e.Name())); err != nil {
			return err
		}
	}
	if err := os.Remove(dir); err != nil {
		return fmt.Errorf("fast path: %w", err)
	}
	return nil
}

// Pods lists the pods the fast path is attached to, by uid.
func (l *Loader) Pods() ([]string, error) {
	ents, err := os.ReadDir(filepath.Join(l.dir, podsDir))
	if err != nil {
		return nil, fmt.Errorf("list fast path pods: %w", err)
	}
	var uids []string
	for _, e := range ents {
		uids = append(uids, e.Name())
	}
	return uids, nil
}

// PodStatus reads pod uid's attachment and counters. A pod without the
// fast path gives ErrNotAttached.
func (l *Loader) PodStatus(uid string) (Status, error) {
	dir := filepath.Join(l.dir, podsDir, uid)
	ents, err := os.ReadDir(dir)
	if err != nil || len(ents) == 0 {
		return Status{}, fmt.Errorf("%s: %w", uid, ErrNotAttached)
	}
	idxs, mode, _ := strings.Cut(strings.TrimPrefix(ents[0].Name(), linkPrefix), "_")
	idx, err := strconv.ParseUint(idxs, 10, 32)
	if err != nil {
		return Status{}, fmt.Errorf("fast path %s: bad pin %s", uid, ents[0].Name())
	}
	st := Status{Index: uint32(idx), Mode: mode, Attached: tcattach.PinnedLinkState(filepath.Join(dir, ents[0].Name())).Attached}
	var c fastpathFpCounters
	if err := bpffs.ReadIndex(l.pin(pinStats), st.Index, &c); err != nil {
		return st, fmt.Errorf("fast path %s counters: %w", uid, err)
	}
	st.Counters = Counters{AppSockets: c.AppSocks, Paired: c.Paired, MsgsToProxy: c.MsgsToProxy,
		BytesToProxy: c.BytesToProxy, MsgsToApp: c.MsgsToApp, BytesToApp: c.BytesToApp,
		Fallback: c.Fallback, Full: c.Full}
	return st, nil
}

// RemoveNodeState removes the node's programs and maps once no pod and no
// proxy is attached (for an uninstall, and tests). Sockets still recorded
// stay redirected until they close: the kernel keeps the map while they
// hold it.
func (l *Loader) RemoveNodeState() error {
	unlock, err := l.lock()
	if err != nil {
		return err
	}
	defer unlock()
	pods, _ := l.Pods()
	proxies, _ := l.Proxies()
	if len(pods) > 0 || len(proxies) > 0 {
		return fmt.Errorf("fast path still attached: %d pods, %d proxies", len(pods), len(proxies))
	}
	var errs []error
	for _, p := range []string{pinProgMsg, pinProgPxy, pinSocks, pinMeta, pinStats, pinBuild} {
		if err := os.Remove(l.pin(p)); err != nil && !errors.Is(err, fs.ErrNotExist) {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}
