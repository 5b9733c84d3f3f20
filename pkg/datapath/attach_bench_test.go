//go:build linux

package datapath

import (
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/ambpf/ambpf/pkg/bpffs/bpffstest"
	"github.com/ambpf/ambpf/pkg/nettest"
)

// BenchmarkAttachDetach enrols and removes one pod over and over, with the
// node's programs loaded already: the cost of a pod enrolment on its own
// (go test -bench AttachDetach -cpuprofile to see where it goes).
func BenchmarkAttachDetach(b *testing.B) {
	requireRoot(b)
	topo := nettest.NewTopology(b, 2)
	mnt := bpffstest.Mount(b)
	l, err := New(Config{Root: filepath.Join(mnt, "ambpf"), Mode: benchMode(), Logger: slog.New(slog.NewTextHandler(io.Discard, nil))})
	if err != nil {
		b.Fatal(err)
	}
	// A neighbour keeps the node's programs loaded.
	if _, err := l.Attach(Pod{UID: "neighbour", Netns: topo.Pod(1).NS}); err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { l.Detach("neighbour") })
	p := topo.Pod(0)
	var attach, detach time.Duration
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		t0 := time.Now()
		if _, err := l.Attach(Pod{UID: "bench", Netns: p.NS}); err != nil {
			b.Fatal(err)
		}
		t1 := time.Now()
		if err := l.Detach("bench"); err != nil {
			b.Fatal(err)
		}
		attach += t1.Sub(t0)
		detach += time.Since(t1)
	}
	b.ReportMetric(float64(attach.Microseconds())/float64(b.N), "attach-us")
	b.ReportMetric(float64(detach.Microseconds())/float64(b.N), "detach-us")
}

// benchMode is the attach mode AMBPF_BENCH_MODE names (tcx, clsact), or
// the detected one.
func benchMode() Mode {
	switch os.Getenv("AMBPF_BENCH_MODE") {
	case "tcx":
		return ModeTCX
	case "clsact":
		return ModeClsact
	}
	return 0
}
