//go:build linux

package kubetest

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/clientcmd"
	clientcmdapi "k8s.io/client-go/tools/clientcmd/api"
)

// Timeouts sized for a loaded 2-core CI machine; a healthy start takes a
// few seconds.
const (
	etcdReadyTimeout      = 60 * time.Second
	apiserverReadyTimeout = 120 * time.Second
	stopGrace             = 10 * time.Second
	// portAttempts bounds retries when a randomly chosen port was taken
	// between choosing it and the server binding it.
	portAttempts = 3
)

// ServiceCIDR is the API server's --service-cluster-ip-range.
const ServiceCIDR = "10.96.0.0/16"

// ControlPlane is a running etcd and kube-apiserver on loopback. There is
// no controller manager, scheduler or kubelet: objects are stored and
// served, RBAC is enforced, but nothing reconciles them (a Deployment
// makes no Pods, a deleted Namespace stays Terminating). Tests create Pods
// through the API and play the kubelet themselves.
type ControlPlane struct {
	// Dir is the temporary directory holding etcd's data, keys, logs,
	// the kubeconfig and helm's state; Stop removes it.
	Dir string
	// BinDir holds etcd, kube-apiserver, kubectl and helm.
	BinDir string
	// Server is the API server URL (https://127.0.0.1:<port>).
	Server string
	// Kubeconfig is a kubeconfig file for the admin user.
	Kubeconfig string
	// Config is the admin's client configuration: a member of
	// system:masters, which RBAC allows everything.
	Config *rest.Config
	// Client is a clientset for Config.
	Client *kubernetes.Clientset

	// CAFile is the PEM CA that signed the API server's certificate.
	CAFile string
	// ServiceAccountKeyFile is the PEM key that signs service-account
	// tokens (a controller manager's --service-account-private-key-file).
	ServiceAccountKeyFile string

	opts      Options
	etcd      *process
	apiserver *process
}

// Options changes how NewWithOptions starts the control plane; the zero
// value is New's loopback-only control plane.
type Options struct {
	// Address is the API server's bind and advertise address instead of
	// 127.0.0.1: pods of a real node reach it there (loopback is theirs).
	Address net.IP
	// ExtraSANs are more IP addresses in the serving certificate, e.g. the
	// kubernetes Service IP that in-cluster clients dial.
	ExtraSANs []net.IP
	// ServiceAccountAdmission keeps the ServiceAccount admission plugin,
	// for a control plane with a controller manager that creates each
	// namespace's default ServiceAccount.
	ServiceAccountAdmission bool
	// ExtraArgs are appended to kube-apiserver's arguments.
	ExtraArgs []string
}

// New starts etcd and kube-apiserver in a fresh temporary directory and
// waits until the API server reports /readyz. binDir must hold the
// binaries (see EnsureBinaries). On error everything started is stopped.
func New(ctx context.Context, binDir string) (*ControlPlane, error) {
	return NewWithOptions(ctx, binDir, Options{})
}

// NewWithOptions is New with the API server configured by opts.
func NewWithOptions(ctx context.Context, binDir string, opts Options) (*ControlPlane, error) {
	dir, err := os.MkdirTemp("", "kubetest-")
	if err != nil {
		return nil, fmt.Errorf("create control plane dir: %w", err)
	}
	cp := &ControlPlane{Dir: dir, BinDir: binDir, opts: opts}
	etcdURL, err := cp.startEtcd(ctx)
	if err == nil {
		err = cp.startAPIServer(ctx, etcdURL)
	}
	if err != nil {
		return nil, errors.Join(err, cp.Stop())
	}
	return cp, nil
}

// Stop stops the API server, then etcd (with anything they spawned), and
// removes Dir. It is safe to call more than once.
func (cp *ControlPlane) Stop() error {
	var errs []error
	for _, p := range []**process{&cp.apiserver, &cp.etcd} {
		if *p != nil {
			errs = append(errs, (*p).stop(stopGrace))
			*p = nil
		}
	}
	if cp.Dir != "" {
		if err := os.RemoveAll(cp.Dir); err != nil {
			errs = append(errs, fmt.Errorf("remove %s: %w", cp.Dir, err))
		}
		cp.Dir = ""
	}
	return errors.Join(errs...)
}

// Command returns a command running one of BinDir's programs (kubectl,
// helm, ...) against this control plane: KUBECONFIG points at Kubeconfig
// and helm keeps its cache, config and data under Dir.
func (cp *ControlPlane) Command(ctx context.Context, name string, args ...string) *exec.Cmd {
	cmd := exec.CommandContext(ctx, filepath.Join(cp.BinDir, name), args...)
	helm := filepath.Join(cp.Dir, "helm")
	cmd.Env = append(os.Environ(),
		"KUBECONFIG="+cp.Kubeconfig,
		"HELM_CACHE_HOME="+filepath.Join(helm, "cache"),
		"HELM_CONFIG_HOME="+filepath.Join(helm, "config"),
		"HELM_DATA_HOME="+filepath.Join(helm, "data"),
	)
	return cmd
}

// Run runs Command and returns its combined output; a non-zero exit is an
// error that quotes the output.
func (cp *ControlPlane) Run(ctx context.Context, name string, args ...string) (string, error) {
	out, err := cp.Command(ctx, name, args...).CombinedOutput()
	if err != nil {
		return string(out), fmt.Errorf("%s %s: %w: %s", name, strings.Join(args, " "), err, out)
	}
	return string(out), nil
}

// ImpersonatedConfig returns a copy of Config that acts as user (with the
// given groups), so a test sees exactly what RBAC grants that user; for a
// service account the user is system:serviceaccount:<ns>:<name>.
func (cp *ControlPlane) ImpersonatedConfig(user string, groups ...string) *rest.Config {
	c := rest.CopyConfig(cp.Config)
	c.Impersonate = rest.ImpersonationConfig{UserName: user, Groups: groups}
	return c
}

// ServiceAccountConfig is ImpersonatedConfig for the service account
// namespace/name with the groups the API server gives service accounts.
func (cp *ControlPlane) ServiceAccountConfig(namespace, name string) *rest.Config {
	return cp.ImpersonatedConfig("system:serviceaccount:"+namespace+":"+name,
		"system:serviceaccounts", "system:serviceaccounts:"+namespace, "system:authenticated")
}

// ServiceAccountKubeconfig writes a kubeconfig file that acts as the
// service account namespace/name (ServiceAccountConfig's impersonation),
// for a binary under test that takes --kubeconfig, and returns its path.
func (cp *ControlPlane) ServiceAccountKubeconfig(namespace, name string) (string, error) {
	cfg, err := clientcmd.LoadFromFile(cp.Kubeconfig)
	if err != nil {
		return "", fmt.Errorf("load kubeconfig: %w", err)
	}
	imp := cp.ServiceAccountConfig(namespace, name).Impersonate
	for _, ai := range cfg.AuthInfos {
		ai.Impersonate, ai.ImpersonateGroups = imp.UserName, imp.Groups
	}
	path := filepath.Join(cp.Dir, "kubeconfig-"+namespace+"-"+name)
	if err := clientcmd.WriteToFile(*cfg, path); err != nil {
		return "", fmt.Errorf("write kubeconfig: %w", err)
	}
	return path, nil
}

func (cp *ControlPlane) startEtcd(ctx context.Context) (string, error) {
	var lastErr error
	for range portAttempts {
		ports, err := freePorts(2)
		if err != nil {
			return "", err
		}
		clientURL := "http://127.0.0.1:" + strconv.Itoa(ports[0])
		peerURL := "http://127.0.0.1:" + strconv.Itoa(ports[1])
		p, err := startProcess("etcd", filepath.Join(cp.BinDir, "etcd"), []string{
			"--name=kubetest",
			"--data-dir=" + filepath.Join(cp.Dir, "etcd"),
			"--listen-client-urls=" + clientURL,
			"--advertise-client-urls=" + clientURL,
			"--listen-peer-urls=" + peerURL,
			"--initial-advertise-peer-urls=" + peerURL,
			"--initial-cluster=kubetest=" + peerURL,
			"--log-level=warn",
			// Throwaway data: durability costs seconds on a busy disk.
			"--unsafe-no-fsync=true",
		}, filepath.Join(cp.Dir, "etcd.log"))
		if err != nil {
			return "", err
		}
		cp.etcd = p
		err = waitReady(ctx, p, etcdReadyTimeout, func(ctx context.Context) error {
			return httpOK(ctx, http.DefaultClient, clientURL+"/health")
		})
		if err == nil {
			return clientURL, nil
		}
		lastErr = err
		if stopErr := p.stop(stopGrace); stopErr != nil {
			return "", errors.Join(err, stopErr)
		}
		cp.etcd = nil
		if !strings.Contains(err.Error(), "address already in use") {
			break
		}
	}
	return "", lastErr
}

func (cp *ControlPlane) startAPIServer(ctx context.Context, etcdURL string) error {
	addr := "127.0.0.1"
	sans := cp.opts.ExtraSANs
	if cp.opts.Address != nil {
		addr = cp.opts.Address.String()
		sans = append(sans, cp.opts.Address)
	}
	keys, err := newPKI(cp.Dir, sans...)
	if err != nil {
		return err
	}
	cp.CAFile, cp.ServiceAccountKeyFile = keys.caFile, keys.saKey
	admission := "--disable-admission-plugins=ServiceAccount"
	if cp.opts.ServiceAccountAdmission {
		admission = "--disable-admission-plugins="
	}
	token, err := randomToken()
	if err != nil {
		return err
	}
	tokenFile := filepath.Join(cp.Dir, "tokens.csv")
	// token,user,uid,"group,..."
	if err := os.WriteFile(tokenFile, []byte(token+",kubetest-admin,kubetest-admin,\"system:masters\"\n"), 0o600); err != nil {
		return fmt.Errorf("write token file: %w", err)
	}
	var lastErr error
	for range portAttempts {
		ports, err := freePorts(1)
		if err != nil {
			return err
		}
		port := strconv.Itoa(ports[0])
		cp.Server = "https://" + net.JoinHostPort(addr, port)
		cp.Config = &rest.Config{
			Host:            cp.Server,
			BearerToken:     token,
			TLSClientConfig: rest.TLSClientConfig{CAData: keys.caPEM},
			// The defaults (5 QPS) throttle helm-sized bursts for seconds.
			QPS:   100,
			Burst: 200,
		}
		p, err := startProcess("kube-apiserver", filepath.Join(cp.BinDir, "kube-apiserver"), append([]string{
			"--etcd-servers=" + etcdURL,
			"--bind-address=" + addr,
			"--advertise-address=" + addr,
			// A loopback advertise address may not be published as the
			// kubernetes Service's endpoint; nothing here needs it.
			"--endpoint-reconciler-type=none",
			"--secure-port=" + port,
			"--tls-cert-file=" + keys.servingCrt,
			"--tls-private-key-file=" + keys.servingKey,
			"--cert-dir=" + filepath.Join(cp.Dir, "apiserver-certs"),
			"--token-auth-file=" + tokenFile,
			"--authorization-mode=RBAC",
			"--service-account-issuer=https://kubernetes.default.svc.cluster.local",
			"--service-account-key-file=" + keys.saPub,
			"--service-account-signing-key-file=" + keys.saKey,
			"--service-cluster-ip-range=" + ServiceCIDR,
			// The agent and proxy DaemonSets are privileged.
			"--allow-privileged=true",
			// No controller manager creates each namespace's "default"
			// ServiceAccount, which this plugin would demand of every Pod.
			admission,
			"--profiling=false",
		}, cp.opts.ExtraArgs...), filepath.Join(cp.Dir, "kube-apiserver.log"))
		if err != nil {
			return err
		}
		cp.apiserver = p
		client, err := kubernetes.NewForConfig(cp.Config)
		if err != nil {
			return fmt.Errorf("create clientset: %w", err)
		}
		cp.Client = client
		err = waitReady(ctx, p, apiserverReadyTimeout, func(ctx context.Context) error {
			_, err := client.Discovery().RESTClient().Get().AbsPath("/readyz").DoRaw(ctx)
			return err
		})
		if err == nil {
			return cp.writeKubeconfig(token, keys.caPEM)
		}
		lastErr = err
		if stopErr := p.stop(stopGrace); stopErr != nil {
			return errors.Join(err, stopErr)
		}
		cp.apiserver = nil
		if !strings.Contains(err.Error(), "address already in use") {
			break
		}
	}
	return lastErr
}

func (cp *ControlPlane) writeKubeconfig(token string, caPEM []byte) error {
	cfg := clientcmdapi.NewConfig()
	cfg.Clusters["kubetest"] = &clientcmdapi.Cluster{Server: cp.Server, CertificateAuthorityData: caPEM}
	cfg.AuthInfos["admin"] = &clientcmdapi.AuthInfo{Token: token}
	cfg.Contexts["kubetest"] = &clientcmdapi.Context{Cluster: "kubetest", AuthInfo: "admin"}
	cfg.CurrentContext = "kubetest"
	cp.Kubeconfig = filepath.Join(cp.Dir, "kubeconfig")
	if err := clientcmd.WriteToFile(*cfg, cp.Kubeconfig); err != nil {
		return fmt.Errorf("write kubeconfig: %w", err)
	}
	return nil
}

// waitReady polls probe until it succeeds, the process exits (the error
// then quotes its log) or timeout passes.
func waitReady(ctx context.Context, p *process, timeout time.Duration, probe func(context.Context) error) error {
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	tick := time.NewTicker(200 * time.Millisecond)
	defer tick.Stop()
	var lastErr error
	for {
		if p.exited() {
			return fmt.Errorf("%s exited before ready (%v); log:\n%s", p.name, p.err, p.logTail(30))
		}
		pctx, pcancel := context.WithTimeout(ctx, 5*time.Second)
		lastErr = probe(pctx)
		pcancel()
		if lastErr == nil {
			return nil
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("%s not ready after %s: %w; log:\n%s", p.name, timeout, lastErr, p.logTail(30))
		case <-tick.C:
		}
	}
}

func httpOK(ctx context.Context, c *http.Client, url string) error {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
	if err != nil {
		return err
	}
	resp, err := c.Do(req)
	if err != nil {
		return err
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return fmt.Errorf("GET %s: %s", url, resp.Status)
	}
	return nil
}

// freePorts returns n distinct loopback TCP ports that were free a moment
// ago; callers retry when one was taken meanwhile.
func freePorts(n int) ([]int, error) {
	ports := make([]int, 0, n)
	var ls []net.Listener
	defer func() {
		for _, l := range ls {
			l.Close()
		}
	}()
	for range n {
		l, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			return nil, fmt.Errorf("find a free port: %w", err)
		}
		ls = append(ls, l)
		ports = append(ports, l.Addr().(*net.TCPAddr).Port)
	}
	return ports, nil
}

func randomToken() (string, error) {
	b := make([]byte, 16)
	if _, err := rand.Read(b); err != nil {
		return "", fmt.Errorf("generate token: %w", err)
	}
	return hex.EncodeToString(b), nil
}
