//go:build linux

package proxy

import (
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"encoding/pem"
	"fmt"
	"log/slog"
	"net/http"
	"net/http/pprof"
	"slices"
	"strings"
	"time"

	"github.com/ambpf/ambpf/pkg/authz"
	"github.com/ambpf/ambpf/pkg/discovery"
)

// DefaultAdminAddr is ztunnel's admin address: port 15000, loopback
// only, in the proxy's own network namespace.
const DefaultAdminAddr = "127.0.0.1:15000"

// Admin endpoint paths, as ztunnel's (src/admin.rs).
const (
	AdminConfigDumpPath = "/config_dump"
	AdminLoggingPath    = "/logging"
	AdminQuitPath       = "/quitquitquit"
	AdminPprofPath      = "/debug/pprof/"
)

// ConfigDump is what /config_dump serves, shaped as ztunnel's (admin.rs
// ConfigDump: the proxy state's workloads, services and policies,
// certificates, the workload manager's state under workloadState) so that
// istioctl ztunnel-config style tools can read it. It holds no private
// key and no credential.
type ConfigDump struct {
	Workloads     []*discovery.Workload `json:"workloads"`
	Services      []*discovery.Service  `json:"services"`
	Policies      []authz.Policy        `json:"policies"`
	Certificates  []CertsDump           `json:"certificates"`
	WorkloadState map[string]PodState   `json:"workloadState"`
	// RootNamespace is ambpf's addition: the namespace whose policies
	// apply mesh-wide, to tell which policies select a workload.
	RootNamespace string      `json:"rootNamespace"`
	Config        adminConfig `json:"config"`
}

// CertsDump is one pod identity's certificates, as ztunnel's CertsDump.
type CertsDump struct {
	Identity  string     `json:"identity"`
	State     string     `json:"state"` // "Available" or "Initializing"
	CertChain []CertDump `json:"certChain"`
	RootCerts []CertDump `json:"rootCerts"`
}

// CertDump is one certificate, as ztunnel's CertDump (times RFC 3339).
type CertDump struct {
	PEM            string `json:"pem"`
	SerialNumber   string `json:"serialNumber"`
	ValidFrom      string `json:"validFrom"`
	ExpirationTime string `json:"expirationTime"`
}

// PodState is one pod proxy as ztunnel's workload manager reports it
// (inpod/admin.rs ProxyState): Up, or Pending when its start failed and
// is retried.
type PodState struct {
	State string  `json:"state"`
	Info  PodInfo `json:"info"`
}

// PodInfo is ztunnel's WorkloadInfo.
type PodInfo struct {
	Name           string `json:"name,omitempty"`
	Namespace      string `json:"namespace,omitempty"`
	ServiceAccount string `json:"serviceAccount,omitempty"`
}

// adminConfig is the Config shown in the dump without what holds
// credentials (the Kubernetes client configuration) or is not data.
type adminConfig struct {
	Config
	// Kubernetes hides Config.Kubernetes (tokens, keys): whether the API
	// is watched.
	Kubernetes bool
	Logger     string `json:",omitempty"`
	LogLevel   string `json:",omitempty"`
}

// adminMux serves the admin endpoint.
func (p *Proxy) adminMux() *http.ServeMux {
	mux := http.NewServeMux()
	mux.HandleFunc("GET "+AdminConfigDumpPath, func(w http.ResponseWriter, _ *http.Request) {
		w.Header().Set("Content-Type", "application/json")
		enc := json.NewEncoder(w)
		enc.SetIndent("", "  ")
		if err := enc.Encode(p.ConfigDump()); err != nil {
			p.log.Warn("admin: write config dump", "err", err)
		}
	})
	mux.HandleFunc(AdminLoggingPath, p.handleLogging)
	mux.HandleFunc(AdminQuitPath, func(w http.ResponseWriter, r *http.Request) {
		if r.Method != http.MethodPost {
			w.WriteHeader(http.StatusMethodNotAllowed)
			return
		}
		p.log.Info("admin: shutdown requested (" + AdminQuitPath + ")")
		p.quitOnce.Do(func() { close(p.quit) })
		fmt.Fprintln(w, "shutdown now")
	})
	mux.HandleFunc(AdminPprofPath, pprof.Index)
	mux.HandleFunc(AdminPprofPath+"cmdline", pprof.Cmdline)
	mux.HandleFunc(AdminPprofPath+"profile", pprof.Profile)
	mux.HandleFunc(AdminPprofPath+"symbol", pprof.Symbol)
	mux.HandleFunc(AdminPprofPath+"trace", pprof.Trace)
	mux.HandleFunc("GET /{$}", func(w http.ResponseWriter, _ *http.Request) {
		fmt.Fprintf(w, "ambpf-proxy admin\n  %s\n  %s (POST ?level=)\n  %s\n  %s (POST)\n",
			AdminConfigDumpPath, AdminLoggingPath, AdminPprofPath, AdminQuitPath)
	})
	return mux
}

// handleLogging is ztunnel's /logging: POST with ?level=<level> sets the
// level, with ?reset the startup level; POST alone reports it; other
// methods are 405. ztunnel's per-scope levels (scope=level) are refused:
// the proxy has one level.
func (p *Proxy) handleLogging(w http.ResponseWriter, r *http.Request) {
	if r.Method != http.MethodPost {
		http.Error(w, "Invalid HTTP method\nusage: POST "+AdminLoggingPath+"?level=<off|error|warn|info|debug|trace> or ?reset", http.StatusMethodNotAllowed)
		return
	}
	lv := p.cfg.LogLevel
	if lv == nil {
		http.Error(w, "the log level is fixed (Config.LogLevel unset)", http.StatusNotImplemented)
		return
	}
	q := r.URL.Query()
	switch {
	case q.Has("reset"):
		lv.Set(p.startLevel)
	case q.Get("level") != "":
		l, ok := parseAdminLevel(q.Get("level"))
		if !ok {
			http.Error(w, "Invalid level provided: "+q.Get("level"), http.StatusBadRequest)
			return
		}
		lv.Set(l)
		p.log.Info("admin: log level changed", "level", l.String())
	}
	fmt.Fprintf(w, "current log level is %s\n", adminLevelName(lv.Level()))
}

// adminLevelName names a level as ztunnel does: lower case, "off" above
// error.
func adminLevelName(l slog.Level) string {
	if l > slog.LevelError {
		return "off"
	}
	return strings.ToLower(l.String())
}

// levelOff is above every level the proxy logs at.
const levelOff = slog.LevelError + 4

// parseAdminLevel reads ztunnel's level names: trace is debug here, off
// is above every level the proxy logs at.
func parseAdminLevel(s string) (slog.Level, bool) {
	switch strings.ToLower(s) {
	case "off":
		return levelOff, true
	case "trace":
		return slog.LevelDebug, true
	}
	var l slog.Level
	if err := l.UnmarshalText([]byte(s)); err != nil {
		return 0, false
	}
	return l, true
}

// ConfigDump returns the proxy's state as /config_dump serves it.
func (p *Proxy) ConfigDump() ConfigDump {
	d := ConfigDump{
		Workloads:     p.store.Workloads(),
		Services:      p.store.Services(),
		Policies:      p.store.Policies(),
		WorkloadState: map[string]PodState{},
		RootNamespace: p.store.RootNamespace(),
		Config:        adminConfig{Config: p.cfg, Kubernetes: p.cfg.Kubernetes != nil},
	}
	if p.cfg.LogLevel != nil {
		d.Config.LogLevel = p.cfg.LogLevel.Level().String()
	}
	var roots []CertDump
	if r, ok := p.auth.(interface{ RootsPEM() []byte }); ok {
		roots = dumpPEM(r.RootsPEM())
	}
	p.mu.Lock()
	pods := make([]*pod, 0, len(p.pods))
	for uid, pd := range p.pods {
		pods = append(pods, pd)
		d.WorkloadState[uid] = PodState{State: "Up", Info: PodInfo{Name: pd.info.Name, Namespace: pd.info.Namespace, ServiceAccount: pd.info.ServiceAccount}}
	}
	for uid := range p.failed {
		d.WorkloadState[uid] = PodState{State: "Pending"}
	}
	p.mu.Unlock()
	for _, pd := range pods {
		cd := CertsDump{Identity: pd.id.String(), State: "Initializing", RootCerts: roots}
		if c := pd.creds.Certificate(); c != nil {
			cd.State, cd.CertChain = "Available", dumpChain(c)
		}
		d.Certificates = append(d.Certificates, cd)
	}
	slices.SortFunc(d.Certificates, func(a, b CertsDump) int { return strings.Compare(a.Identity, b.Identity) })
	return d
}

// dumpChain describes a certificate chain; the private key is never read.
func dumpChain(c *tls.Certificate) []CertDump {
	out := make([]CertDump, 0, len(c.Certificate))
	for _, der := range c.Certificate {
		if cert, err := x509.ParseCertificate(der); err == nil {
			out = append(out, dumpCert(cert))
		}
	}
	return out
}

// dumpPEM describes every CERTIFICATE block of a PEM bundle.
func dumpPEM(data []byte) []CertDump {
	var out []CertDump
	for {
		var b *pem.Block
		if b, data = pem.Decode(data); b == nil {
			return out
		}
		if b.Type != "CERTIFICATE" {
			continue
		}
		if cert, err := x509.ParseCertificate(b.Bytes); err == nil {
			out = append(out, dumpCert(cert))
		}
	}
}

func dumpCert(c *x509.Certificate) CertDump {
	return CertDump{
		PEM:            string(pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: c.Raw})),
		SerialNumber:   c.SerialNumber.Text(16),
		ValidFrom:      c.NotBefore.UTC().Format(time.RFC3339),
		ExpirationTime: c.NotAfter.UTC().Format(time.RFC3339),
	}
}
