//go:build linux

package proxy

import (
	"context"
	"encoding/json"
	"io"
	"net"
	"net/http"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/ambpf/ambpf/pkg/agent/agenttest"
	"github.com/ambpf/ambpf/pkg/metrics"
	"github.com/ambpf/ambpf/pkg/netlab"
	"github.com/ambpf/ambpf/pkg/nodelab"
)

// TestAdminBinary: the installed proxy serves ztunnel's admin endpoint
// (src/admin.rs) on loopback of its network namespace: /config_dump with
// the workloads, the pods' certificates (no private key) and the
// workload-manager state; /logging changes the level at run time (the
// access-log lines stop at level error and come back at info); pprof;
// and ambpfctl's proxy views read it (the pod view next to the agent's
// datapath view). /quitquitquit then stops the proxy.
func TestAdminBinary(t *testing.T) {
	m := newMeshNode(t, 2)
	bins := buildBinaries(t, "ambpfctl")
	m.startAgent()
	proxy := m.startProxy(0, "--log-level", "info")
	id := m.meshAB()
	uidA := "a-" + id
	admin := proxyAdminAddr(0)
	c := &http.Client{Timeout: 10 * time.Second, Transport: &http.Transport{
		DialContext: func(ctx context.Context, network, addr string) (net.Conn, error) {
			return m.lab.Node.Dial(ctx, network, addr)
		},
	}}
	t.Cleanup(c.CloseIdleConnections)
	call := func(method, path string) (int, string) {
		t.Helper()
		return do(t, c, method, "http://"+admin+path)
	}
	get := func(c *http.Client, url string) (int, string) {
		t.Helper()
		return do(t, c, "GET", url)
	}

	code, body := call("GET", AdminConfigDumpPath)
	if code != http.StatusOK {
		t.Fatalf("config_dump: %d %s", code, body)
	}
	if strings.Contains(body, "PRIVATE KEY") {
		t.Error("config_dump holds a private key")
	}
	var d ConfigDump
	if err := json.Unmarshal([]byte(body), &d); err != nil {
		t.Fatalf("config_dump is not JSON: %v", err)
	}
	wantID := "spiffe://cluster.local/ns/ns-pod0/sa/sa"
	var found bool
	for _, w := range d.Workloads {
		found = found || (w.UID == uidA && len(w.IPs) > 0 && w.IPs[0] == m.lab.Pod(0).IPv4)
	}
	if !found {
		t.Errorf("config_dump workloads lack pod A (%s): %+v", uidA, d.Workloads)
	}
	if st := d.WorkloadState[uidA]; st.State != "Up" || st.Info.Name != m.lab.Pod(0).Name {
		t.Errorf("workloadState[%s] = %+v, want Up", uidA, st)
	}
	var cert *CertsDump
	for i := range d.Certificates {
		if d.Certificates[i].Identity == wantID {
			cert = &d.Certificates[i]
		}
	}
	if cert == nil || cert.State != "Available" || len(cert.CertChain) == 0 || len(cert.RootCerts) == 0 {
		t.Fatalf("certificates %+v: want %s available with its chain and roots", d.Certificates, wantID)
	}
	if exp, err := time.Parse(time.RFC3339, cert.CertChain[0].ExpirationTime); err != nil || !exp.After(time.Now()) {
		t.Errorf("certificate expiration %q: %v", cert.CertChain[0].ExpirationTime, err)
	}

	// /logging: ztunnel's methods and answers; the level takes effect.
	if code, _ := call("GET", AdminLoggingPath); code != http.StatusMethodNotAllowed {
		t.Errorf("GET /logging = %d, want 405", code)
	}
	if code, _ := call("POST", AdminLoggingPath+"?level=bogus"); code != http.StatusBadRequest {
		t.Errorf("POST /logging?level=bogus = %d, want 400", code)
	}
	if code, body := call("POST", AdminLoggingPath+"?level=error"); code != http.StatusOK || body != "current log level is error\n" {
		t.Errorf("POST /logging?level=error = %d %q", code, body)
	}
	// A connection at level error: counted closed, not logged. The
	// closed counters move when the proxy closes it, so once both ends
	// are counted no line of it can still come.
	closed := func() float64 {
		t.Helper()
		_, body := get(c, "http://"+proxyMetricsAddr(0)+"/metrics")
		return sumMetric(t, body, metrics.ConnectionsClosedName)
	}
	lines, closed0 := countAccessLines(t, proxy), closed()
	if !m.served(0, 1, "b") {
		t.Fatal("A no longer reaches B")
	}
	agenttest.WaitFor(t, 10*time.Second, "both ends of the connection closed", func() bool { return closed() >= closed0+2 })
	if code, body := call("POST", AdminLoggingPath+"?level=info"); code != http.StatusOK || body != "current log level is info\n" {
		t.Errorf("POST /logging?level=info = %d %q", code, body)
	}
	if n := countAccessLines(t, proxy); n != lines {
		t.Errorf("%d access-log lines written at level error", n-lines)
	}
	if !m.served(0, 1, "b") {
		t.Fatal("A no longer reaches B")
	}
	agenttest.WaitFor(t, 10*time.Second, "the two access-log lines of a connection at level info", func() bool {
		return countAccessLines(t, proxy) == lines+2
	})

	if code, body := call("GET", AdminPprofPath+"cmdline"); code != http.StatusOK || !strings.Contains(body, "--admin-addr") {
		t.Errorf("pprof cmdline: %d %q", code, body)
	}
	if code, body := call("GET", AdminPprofPath+"heap?debug=1"); code != http.StatusOK || !strings.Contains(body, "heap profile") {
		t.Errorf("pprof heap: %d %.80q", code, body)
	}

	// ambpfctl's views, run in the node netns as in the proxy's pod.
	ctl := func(args ...string) string {
		t.Helper()
		full := append([]string{"--net=" + m.lab.Node.NSPath, filepath.Join(bins, "ambpfctl"),
			"--socket", m.ae.Config.APISocket, "proxy", "--admin", "http://" + admin}, args...)
		out, err := netlab.Run(exec.Command("nsenter", full...))
		if err != nil {
			t.Fatalf("ambpfctl %v: %v\n%s", args, err, out)
		}
		return string(out)
	}
	if out := ctl("workloads"); !strings.Contains(out, m.lab.Pod(0).IPv4.String()) || !strings.Contains(out, "HBONE") {
		t.Errorf("ambpfctl proxy workloads:\n%s", out)
	}
	if out := ctl("certificates"); !strings.Contains(out, wantID) || !strings.Contains(out, "Available") {
		t.Errorf("ambpfctl proxy certificates:\n%s", out)
	}
	out := ctl("pod", uidA)
	for _, want := range []string{"identity:     " + wantID, "certificate:  Available, expires " + cert.CertChain[0].ExpirationTime,
		"proxy state:  Up", "options     DNS capture"} {
		if !strings.Contains(out, want) {
			t.Errorf("ambpfctl proxy pod lacks %q:\n%s", want, out)
		}
	}

	if code, _ := call("GET", AdminQuitPath); code != http.StatusMethodNotAllowed {
		t.Errorf("GET /quitquitquit = %d, want 405", code)
	}
	if code, body := call("POST", AdminQuitPath); code != http.StatusOK || body != "shutdown now\n" {
		t.Errorf("POST /quitquitquit = %d %q", code, body)
	}
	agenttest.WaitFor(t, 20*time.Second, "the proxy exits after /quitquitquit", proxy.exited)
	if err := proxy.Err(); err != nil {
		t.Errorf("proxy exit after /quitquitquit: %v", err)
	}
}

// do sends one request and returns the status and body.
func do(t *testing.T, c *http.Client, method, url string) (int, string) {
	t.Helper()
	req, err := http.NewRequest(method, url, nil)
	if err != nil {
		t.Fatal(err)
	}
	resp, err := c.Do(req)
	if err != nil {
		t.Fatalf("%s %s: %v", method, url, err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, string(b)
}

// countAccessLines counts the access-log lines in the proxy's log.
func countAccessLines(t *testing.T, p *nodeProcess) int {
	t.Helper()
	return len(nodelab.LogLines(p.LogPath(), 0, "connection complete"))
}
