//go:build linux

package pinset

import (
	"encoding/hex"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"time"

	"github.com/cilium/ebpf"

	"github.com/ambpf/ambpf/pkg/bpffs"
	"github.com/ambpf/ambpf/pkg/bpfobj"
)

// Node is a program family's node-wide build: one loaded set of its
// programs and maps, pinned in Dir and shared by all its attachments.
type Node struct {
	// What names the family in errors and logs ("capture", ...).
	What string
	// Tag is this build's program tag (bpfobj.Tag), for the log.
	Tag [8]byte
	// Log receives one line per load; nil is slog.Default().
	Log *slog.Logger
	// Dir is the node directory.
	Dir string
	// Spec is this build's object, with its map sizes set.
	Spec *ebpf.CollectionSpec
	// Maps are the spec's maps that are pinned in Dir, in pin order: the
	// map recording what runs (the meta Commit writes) belongs last.
	Maps []string
	// Migrate makes a map of the spec from a pinned one whose layout or
	// size differs, carrying its entries over; nil is bpfobj.MigrateMap
	// with the values kept as they are.
	Migrate func(*ebpf.MapSpec, *ebpf.Map) (*ebpf.Map, error)
	// Current reports whether Dir runs this build with these sizes
	// already (read from the meta Commit writes).
	Current func() bool
	// Load loads this build with replace as its map replacements (the
	// pinned maps reused, the migrated ones).
	Load func(replace map[string]*ebpf.Map) (Loaded, error)
}

// Loaded is a loaded build, not yet switched in or published.
type Loaded struct {
	// Maps are the build's maps by name, at least all of Node.Maps.
	Maps map[string]*ebpf.Map
	// Programs are the programs pinned in the node directory, in order.
	Programs []Pin
	// Switch makes the traffic of every attachment run the new programs,
	// each hook or tail-call slot atomically; a first load has nothing to
	// switch. It runs before anything is pinned, so a failure leaves the
	// previous build pinned (and, where it switched nothing, running).
	Switch func() error
	// Commit records the build in the node's meta. It runs last, so a
	// crash before it makes the next Ensure do it all again.
	Commit func() error
	// Close releases the handles; the pins keep what is published.
	Close func()
}

// Pin is an object pinned under Name.
type Pin struct {
	Name string
	Obj  interface{ Pin(string) error }
}

// Ensure makes the node directory run this build. When it does already
// (Current) it returns at once. Otherwise, in this order: the pinned maps
// are opened and reused, or migrated when their layout or size changed;
// the build is loaded over them; Switch moves the traffic; the migrated
// and new maps, then the programs, are pinned over the old pins (each
// rename atomic: a pin is never missing); Commit writes the meta. A load
// is logged with the maps pinned anew (new to the node, or migrated). The
// caller holds the family's node lock.
func (n Node) Ensure() error {
	if n.Current() {
		return nil
	}
	start := time.Now()
	repinned, err := n.load()
	if err != nil {
		return fmt.Errorf("%s node programs: %w", n.What, err)
	}
	log := n.Log
	if log == nil {
		log = slog.Default()
	}
	log.Info("node programs loaded", "programs", n.What, "program_tag", hex.EncodeToString(n.Tag[:]),
		"migrated_or_new_maps", repinned, "took", time.Since(start))
	return nil
}

func (n Node) load() (repinned []string, err error) {
	if err := os.MkdirAll(n.Dir, 0o700); err != nil {
		return nil, fmt.Errorf("create %s: %w", n.Dir, err)
	}
	reused, err := bpfobj.ReusePinned(n.Spec, n.Dir, n.Maps, n.Migrate)
	if err != nil {
		return nil, err
	}
	defer reused.Close()
	b, err := n.Load(reused.Maps)
	if err != nil {
		return nil, err
	}
	defer b.Close()
	if err := b.Switch(); err != nil {
		return nil, err
	}
	var pins []Pin
	for _, name := range reused.Repin {
		m, ok := b.Maps[name]
		if !ok {
			return nil, fmt.Errorf("pin %s: the build has no such map", name)
		}
		pins = append(pins, Pin{name, m})
	}
	for _, p := range append(pins, b.Programs...) {
		if err := bpffs.PinReplacing(p.Obj, filepath.Join(n.Dir, p.Name)); err != nil {
			return nil, err
		}
	}
	if err := b.Commit(); err != nil {
		return nil, fmt.Errorf("write node meta: %w", err)
	}
	return reused.Repin, nil
}
