//go:build linux

package proxy

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/ambpf/ambpf/pkg/datapath"
	"github.com/ambpf/ambpf/pkg/logtest"
	"github.com/ambpf/ambpf/pkg/nettest"
	"github.com/ambpf/ambpf/pkg/zds"
)

// binEnv is a world for tests of the installed proxy: the ambpf-proxy
// binary, built from this tree, runs as a process in the topology's node
// netns (its metrics on 127.0.0.1:15020 there), connected over a real ZDS
// socket to the test's node agent side; pods are enrolled as the agent
// does it (datapath attached, then ZDS Add).
type binEnv struct {
	t      *testing.T
	lab    *nettest.Topology
	loader *datapath.Loader
	dir    string
	logs   *logtest.Buffer
	proc   *nodeProcess
	zdsSrv *zds.Server
	snap   *podList
}

// binMetricsAddr is where the binary serves /metrics, in the node netns.
const binMetricsAddr = "127.0.0.1:15020"

// newBinEnv builds and starts the proxy binary with the extra flags and
// waits until it has taken the ZDS snapshot. Its cleanup stops the
// process (SIGTERM, then SIGKILL) and prints its log on failure.
func newBinEnv(t *testing.T, pods int, flags ...string) *binEnv {
	t.Helper()
	return newBinEnvDiscovery(t, pods, "", flags...)
}

// newBinEnvDiscovery is newBinEnv with a discovery file: {{podN}} in
// discovery is replaced with pod N's IPv4 address.
func newBinEnvDiscovery(t *testing.T, pods int, discovery string, flags ...string) *binEnv {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("proxy binary tests need root (netns, bpffs, IP_TRANSPARENT)")
	}
	// Short: the ZDS socket path must fit in 108 bytes.
	dir, err := os.MkdirTemp("", "ambpf-pxb-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	bin := filepath.Join(buildBinaries(t, "ambpf-proxy"), "ambpf-proxy")
	e := &binEnv{t: t, lab: nettest.NewTopology(t, pods), dir: dir, logs: &logtest.Buffer{}}
	e.loader = testLoader(t)
	disc := filepath.Join(dir, "discovery.yaml")
	for i, pd := range e.lab.Pods {
		discovery = strings.ReplaceAll(discovery, fmt.Sprintf("{{pod%d}}", i), pd.IPv4.String())
	}
	if err := os.WriteFile(disc, []byte(discovery), 0o644); err != nil {
		t.Fatal(err)
	}
	zdsPath := filepath.Join(dir, "zds.sock")
	e.snap = &podList{pods: map[string]zds.Pod{}}
	srv, err := zds.NewServer(zds.ServerConfig{Path: zdsPath, Snapshot: e.snap, Logger: slog.New(slog.NewTextHandler(e.logs, nil))})
	if err != nil {
		t.Fatalf("zds server: %v", err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { srv.Serve(ctx); close(done) }()
	t.Cleanup(func() { cancel(); srv.Close(); <-done })
	e.zdsSrv = srv

	e.proc = startNodeProcess(t, e.lab.Node, dir, "ambpf-proxy", bin, append([]string{
		"--zds-path", zdsPath, "--state-dir", filepath.Join(dir, "state"),
		"--discovery-file", disc, "--metrics-addr", binMetricsAddr, "--ready-addr", "off",
		"--dial-timeout", "2s", "--log-level", "debug",
		// Short: the cleanup's SIGTERM must not wait for a long drain.
		"--drain-timeout", "1s"}, flags...)...)
	waitFor(t, "ambpf-proxy connected over ZDS and synced", func() bool {
		if e.proc.exited() {
			t.Fatalf("ambpf-proxy exited: %v\n%s", e.proc.Err(), e.proc.tail(40))
		}
		return srv.Ready()
	})
	return e
}

// enroll attaches the datapath to pod i and adds it over ZDS; the
// proxy's pod listeners are open when it returns.
func (e *binEnv) enroll(i int, namespace, sa string) string {
	e.t.Helper()
	pd := e.lab.Pod(i)
	uid := "uid-" + pd.Name + "-" + e.lab.ID
	if _, err := e.loader.Attach(datapath.Pod{UID: uid, Netns: pd.NS}); err != nil {
		e.t.Fatalf("attach datapath to %s: %v", pd.Name, err)
	}
	e.t.Cleanup(func() {
		if err := e.loader.Detach(uid); err != nil {
			e.t.Errorf("detach %s: %v", pd.Name, err)
		}
	})
	info := zds.WorkloadInfo{Name: pd.Name, Namespace: namespace, ServiceAccount: sa}
	e.snap.put(zds.Pod{UID: uid, Info: info, OpenNetns: func() (*os.File, error) { return os.Open(pd.NSPath) }})
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if err := e.zdsSrv.Add(ctx, uid, info, pd.NS.File()); err != nil {
		e.t.Fatalf("zds add %s: %v", pd.Name, err)
	}
	return uid
}

// app starts the greeting/echo app on port 8080 of pod i.
func (e *binEnv) app(i int, name string) {
	e.t.Helper()
	a, err := nettest.StartApp(&e.lab.Pod(i).Netns, name, []uint16{nettest.AppPort}, nil)
	if err != nil {
		e.t.Fatal(err)
	}
	e.t.Cleanup(func() { a.Close() })
}

// connect opens a connection from pod i to addr and reads the greeting.
func (e *binEnv) connect(i int, addr string) (*nettest.TCPConn, error) {
	pd := e.lab.Pod(i)
	return nettest.OpenTCP(func(ctx context.Context) (net.Conn, error) { return pd.Dial(ctx, "tcp", addr) })
}

// fds is the number of descriptors the proxy process holds.
func (e *binEnv) fds() int {
	e.t.Helper()
	ents, err := os.ReadDir("/proc/" + strconv.Itoa(e.proc.Pid()) + "/fd")
	if err != nil {
		e.t.Fatalf("proxy fds: %v", err)
	}
	return len(ents)
}

// metrics fetches the proxy's /metrics from inside the node netns.
func (e *binEnv) metrics() string {
	e.t.Helper()
	return e.metricsAt(binMetricsAddr)
}

// metricsAt fetches /metrics from addr inside the node netns.
func (e *binEnv) metricsAt(addr string) string {
	e.t.Helper()
	return getInNetns(e.t, e.lab.Node, "http://"+addr+"/metrics")
}

// getInNetns GETs url from inside ns and returns the body of its 200.
func getInNetns(t *testing.T, ns *nettest.Netns, url string) string {
	t.Helper()
	c := &http.Client{Timeout: 5 * time.Second, Transport: &http.Transport{
		DialContext: func(ctx context.Context, network, addr string) (net.Conn, error) {
			return ns.Dial(ctx, network, addr)
		},
	}}
	defer c.CloseIdleConnections()
	resp, err := c.Get(url)
	if err != nil {
		t.Fatalf("GET %s: %v", url, err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil || resp.StatusCode != http.StatusOK {
		t.Fatalf("GET %s: %d %v", url, resp.StatusCode, err)
	}
	return string(b)
}

// metric sums the samples of name in /metrics whose labels contain every
// one of labels (`key="value"`).
func (e *binEnv) metric(name string, labels ...string) float64 {
	e.t.Helper()
	return sumMetric(e.t, e.metrics(), name, labels...)
}

func sumMetric(t *testing.T, body, name string, labels ...string) float64 {
	t.Helper()
	var sum float64
lines:
	for line := range strings.SplitSeq(body, "\n") {
		if !strings.HasPrefix(line, name+"{") && !strings.HasPrefix(line, name+" ") {
			continue
		}
		for _, l := range labels {
			if !strings.Contains(line, l) {
				continue lines
			}
		}
		v, err := strconv.ParseFloat(line[strings.LastIndexByte(line, ' ')+1:], 64)
		if err != nil {
			t.Fatalf("metric line %q: %v", line, err)
		}
		sum += v
	}
	return sum
}
