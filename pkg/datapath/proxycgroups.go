//go:build linux

package datapath

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"time"

	"github.com/cilium/ebpf"

	"github.com/ambpf/ambpf/pkg/cgroup"
)

// ProxyCgroup is a cgroup whose sockets every pod's programs take as the
// proxy's: packets from them carrying the proxy mark leave uncaptured.
// Packets with the mark from any other cgroup are captured like an app's.
type ProxyCgroup struct {
	// ID is the cgroup v2 id (cgroup.ID).
	ID uint64 `json:"id"`
	// PID is the process that was registered with it, for operators.
	PID uint32 `json:"pid"`
	// Registered is when it was added.
	Registered time.Time `json:"registered"`
}

// proxyCgroupsPin is the node-wide map, shared by every pod's programs.
func (l *Loader) proxyCgroupsPin() string { return filepath.Join(l.root, captureMapProxyCgroups) }

// ensureProxyCgroups creates the node-wide map and pins it at the root
// unless it is there already. The caller holds the lock.
func (l *Loader) ensureProxyCgroups() error {
	m, err := ebpf.NewMapWithOptions(l.spec.Maps[captureMapProxyCgroups], ebpf.MapOptions{PinPath: l.root})
	if err != nil {
		return fmt.Errorf("create %s: %w", l.proxyCgroupsPin(), err)
	}
	return m.Close()
}

func (l *Loader) openProxyCgroups() (*ebpf.Map, error) {
	m, err := ebpf.LoadPinnedMap(l.proxyCgroupsPin(), nil)
	if err != nil {
		return nil, fmt.Errorf("open %s: %w", l.proxyCgroupsPin(), err)
	}
	return m, nil
}

// TrustProxy records the cgroup id as a proxy cgroup for every pod, at
// once; pid names the process it was taken from. Adding an id already
// there refreshes it. The node agent calls it for each process that
// connects to its ZDS socket, before that process is told about any pod.
func (l *Loader) TrustProxy(id uint64, pid int) error {
	if id == 0 {
		return errors.New("trust proxy cgroup: id 0 is no cgroup")
	}
	m, err := l.openProxyCgroups()
	if err != nil {
		return err
	}
	defer m.Close()
	v := captureProxyCgroup{RegisteredUnixNs: uint64(time.Now().UnixNano()), Pid: uint32(pid)}
	if err := m.Put(id, v); err != nil {
		return fmt.Errorf("trust proxy cgroup %d: %w", id, err)
	}
	return nil
}

// TrustProcess makes the cgroup process pid runs in a proxy cgroup (see
// TrustProxy) and returns its directory and id.
func (l *Loader) TrustProcess(pid int) (dir string, id uint64, err error) {
	dir, err = cgroup.OfProcess(pid)
	if err == nil {
		id, err = cgroup.ID(dir)
	}
	if err == nil {
		err = l.TrustProxy(id, pid)
	}
	if err != nil {
		return "", 0, fmt.Errorf("trust the cgroup of process %d: %w", pid, err)
	}
	return dir, id, nil
}

// ForgetProxy removes a proxy cgroup; forgetting one that is not there is
// not an error. Sockets of that cgroup are captured from then on.
func (l *Loader) ForgetProxy(id uint64) error {
	m, err := l.openProxyCgroups()
	if err != nil {
		return err
	}
	defer m.Close()
	if err := m.Delete(id); err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
		return fmt.Errorf("forget proxy cgroup %d: %w", id, err)
	}
	return nil
}

// ProxyCgroups lists the proxy cgroups, oldest first.
func (l *Loader) ProxyCgroups() ([]ProxyCgroup, error) {
	m, err := l.openProxyCgroups()
	if err != nil {
		return nil, err
	}
	defer m.Close()
	var (
		out []ProxyCgroup
		id  uint64
		v   captureProxyCgroup
	)
	it := m.Iterate()
	for it.Next(&id, &v) {
		out = append(out, ProxyCgroup{ID: id, PID: v.Pid, Registered: time.Unix(0, int64(v.RegisteredUnixNs))})
	}
	if err := it.Err(); err != nil {
		return nil, fmt.Errorf("list proxy cgroups: %w", err)
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Registered.Before(out[j].Registered) })
	return out, nil
}

// ErrPodsAttached is RemoveNodeState's answer while pods are attached.
var ErrPodsAttached = errors.New("pods are still attached")

// RemoveNodeState removes the node-wide pins (the shared programs, their
// maps, the proxy cgroup set) once no pod is attached, for an uninstall:
// after it, nothing of the datapath is left under the root. The next New
// and Attach create them afresh.
func (l *Loader) RemoveNodeState() error {
	unlock, err := l.lock()
	if err != nil {
		return err
	}
	defer unlock()
	pods, err := os.ReadDir(filepath.Join(l.root, podsDir))
	if err != nil {
		return fmt.Errorf("remove node state: %w", err)
	}
	if len(pods) > 0 {
		return fmt.Errorf("remove node state: %w (%d)", ErrPodsAttached, len(pods))
	}
	if err := os.Remove(l.proxyCgroupsPin()); err != nil && !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("remove node state: %w", err)
	}
	if err := os.RemoveAll(l.nodeDir()); err != nil {
		return fmt.Errorf("remove node state: %w", err)
	}
	l.nodes.replace(nil) // the maps go with the last handle
	return nil
}
