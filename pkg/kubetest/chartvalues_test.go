//go:build linux

package kubetest

import (
	"bytes"
	"context"
	"crypto/x509"
	"encoding/json"
	"encoding/pem"
	"errors"
	"fmt"
	"io"
	"maps"
	"os"
	"os/exec"
	"path"
	"path/filepath"
	"reflect"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	utilyaml "k8s.io/apimachinery/pkg/util/yaml"
	"sigs.k8s.io/yaml"

	"github.com/ambpf/ambpf/pkg/metrics"
)

// What the kubelet would fill in for the fieldRef variables of the
// rendered pods.
const (
	renderNamespace = "ambpf-system"
	fakeNodeName    = "node-under-test"
	fakePodName     = "pod-under-test"
)

// chartCase is one chart value given a non-default setting, and where it
// must arrive.
type chartCase struct {
	// values are the chart values this case covers (a key covers the
	// keys below it: "agent.resources" covers agent.resources.limits).
	values []string
	// set is a values file (YAML) passed to helm template -f.
	set string
	// check asserts on the render: the binaries' parsed configuration
	// and the pod specs.
	check func(t *testing.T, r *render)
}

// chartCases cover every value of charts/ambpf/values.yaml;
// TestChartValuesReachBinaries fails when one is not covered.
var chartCases = []chartCase{
	{
		values: []string{"image.repository", "image.tag", "image.pullPolicy"},
		set:    "image: {repository: registry.example/mesh/ambpf, tag: v9.9.9, pullPolicy: Always}",
		check: func(t *testing.T, r *render) {
			for _, c := range r.allContainers() {
				if c.c.Image != "registry.example/mesh/ambpf:v9.9.9" || c.c.ImagePullPolicy != corev1.PullAlways {
					t.Errorf("%s: image %q pull %q", c.name, c.c.Image, c.c.ImagePullPolicy)
				}
			}
		},
	},
	{
		values: []string{"imagePullSecrets"},
		set:    "imagePullSecrets: [{name: regcred}]",
		check: func(t *testing.T, r *render) {
			for _, ds := range []string{"agent", "proxy"} {
				if got := r.daemonSet(t, ds).Spec.Template.Spec.ImagePullSecrets; len(got) != 1 || got[0].Name != "regcred" {
					t.Errorf("%s imagePullSecrets %v", ds, got)
				}
			}
			if got := r.deployment(t, "ca").Spec.Template.Spec.ImagePullSecrets; len(got) != 1 || got[0].Name != "regcred" {
				t.Errorf("ca imagePullSecrets %v", got)
			}
		},
	},
	{
		values: []string{"trustDomain"},
		set:    "trustDomain: mesh.example.org",
		check: func(t *testing.T, r *render) {
			r.want(t, "proxy/proxy", "config.TrustDomain", "mesh.example.org")
			if ca := r.caCert(t); !strings.Contains(ca.Subject.CommonName, "mesh.example.org") {
				t.Errorf("generated CA subject %q does not name the trust domain", ca.Subject.CommonName)
			}
			r.want(t, "ca/ca", "TrustDomain", "mesh.example.org")
		},
	},
	{
		values: []string{"dnsCapture"},
		set:    "dnsCapture: false", // the default is true, as in istio-cni
		check: func(t *testing.T, r *render) {
			r.want(t, "proxy/proxy", "config.DNSCapture", false)
			r.want(t, "agent/agent", "kubernetes.dnsCapture", false)
			for _, c := range cniInstallRuns {
				cfg, _ := r.config(t, c)["config"].(map[string]any)
				plugin, ok := cfg["Plugin"].(map[string]any)
				if _, on := plugin["dns_capture"]; !ok || on {
					t.Errorf("%s: plugin config %v, want one without dns_capture (omitted when false)", c, plugin)
				}
			}
		},
	},
	{
		values: []string{"fastPath"},
		set:    "fastPath: to-proxy",
		check: func(t *testing.T, r *render) {
			r.want(t, "agent/agent", "config.FastPath", "to-proxy")
			r.want(t, "proxy/proxy", "config.FastPath", true)
		},
	},
	{
		values: []string{"fastPathDefault"},
		set:    "fastPath: both\nfastPathDefault: disabled",
		check: func(t *testing.T, r *render) {
			r.want(t, "agent/agent", "config.FastPath", "both")
			r.want(t, "agent/agent", "config.FastPathOptIn", true)
		},
	},
	{
		values: []string{"excludedNamespaces"},
		set:    "excludedNamespaces: [kube-system, ops, legacy]",
		check: func(t *testing.T, r *render) {
			r.want(t, "agent/agent", "kubernetes.excludedNamespaces", []string{"kube-system", "ops", "legacy"})
		},
	},
	{
		values: []string{"mtlsMode"},
		set:    "mtlsMode: STRICT",
		check: func(t *testing.T, r *render) {
			r.want(t, "proxy/proxy", "config.MTLSMode", "STRICT")
		},
	},
	{
		values: []string{"logLevel"},
		set:    "logLevel: debug",
		check: func(t *testing.T, r *render) {
			for _, c := range append([]string{"agent/agent", "proxy/proxy"}, cniInstallRuns...) {
				r.want(t, c, "logLevel", "DEBUG")
			}
			r.want(t, "ca/ca", "LogLevel", "DEBUG")
		},
	},
	{
		values: []string{"ca.existingSecret"},
		set:    "ca: {existingSecret: corp-mesh-ca}",
		check: func(t *testing.T, r *render) {
			if s := r.objects(t, "Secret"); len(s) != 0 {
				t.Errorf("a CA Secret is rendered although ca.existingSecret is set")
			}
			spec := r.deployment(t, "ca").Spec.Template.Spec
			v := volume(t, spec, "ca")
			if v.Secret == nil || v.Secret.SecretName != "corp-mesh-ca" {
				t.Errorf("CA volume ca: %+v, want secret corp-mesh-ca", v.VolumeSource)
			}
			r.want(t, "ca/ca", "CADir", mountPath(t, container(t, spec, "ca"), "ca"))
			r.noSecretMounted(t, "proxy")
		},
	},
	{
		values: []string{"ca.validityDays"},
		set:    "ca: {validityDays: 30}",
		check: func(t *testing.T, r *render) {
			ca := r.caCert(t)
			if d := time.Until(ca.NotAfter); d < 29*24*time.Hour || d > 31*24*time.Hour {
				t.Errorf("generated CA valid until %v, want in 30 days", ca.NotAfter)
			}
			spec := r.deployment(t, "ca").Spec.Template.Spec
			if v := volume(t, spec, "ca"); v.Secret == nil || v.Secret.SecretName != "ambpf-ca" {
				t.Errorf("CA volume ca: %+v, want the generated secret ambpf-ca", v.VolumeSource)
			}
			r.want(t, "ca/ca", "CADir", mountPath(t, container(t, spec, "ca"), "ca"))
		},
	},
	{
		values: []string{"cni.binDir", "cni.confDir"},
		set:    "cni: {binDir: /var/lib/cni-bin, confDir: /var/lib/cni-conf}",
		check: func(t *testing.T, r *render) {
			spec := r.daemonSet(t, "agent").Spec.Template.Spec
			r.wantHostPath(t, spec, "cni-bin", "/var/lib/cni-bin")
			r.wantHostPath(t, spec, "cni-conf", "/var/lib/cni-conf")
			for _, run := range cniInstallRuns {
				c := container(t, spec, strings.SplitN(strings.TrimPrefix(run, "agent/"), ":", 2)[0])
				r.want(t, run, "config.BinDir", mountPath(t, c, "cni-bin"))
				r.want(t, run, "config.ConfDir", mountPath(t, c, "cni-conf"))
			}
		},
	},
	{
		values: []string{"cni.pollInterval"},
		set:    "cni: {pollInterval: 17s}",
		check: func(t *testing.T, r *render) {
			for _, c := range cniInstallRuns {
				r.want(t, c, "config.PollInterval", 17*time.Second)
			}
		},
	},
	{
		values: []string{"hostPaths.bpf", "hostPaths.cgroup", "hostPaths.netns", "hostPaths.proc"},
		set:    "hostPaths: {bpf: /mnt/bpf, cgroup: /mnt/cgroup2, netns: /run/netns-x, proc: /mnt/proc}",
		check: func(t *testing.T, r *render) {
			spec := r.daemonSet(t, "agent").Spec.Template.Spec
			r.wantHostPath(t, spec, "bpffs", "/mnt/bpf")
			r.wantHostPath(t, spec, "cgroup", "/mnt/cgroup2")
			r.wantHostPath(t, spec, "netns", "/run/netns-x")
			r.wantHostPath(t, spec, "host-proc", "/mnt/proc")
			agent := container(t, spec, "agent")
			// The pins go under the bpffs mount, and the agent scans the
			// host's /proc where it is mounted.
			root := r.config(t, "agent/agent")["config"].(map[string]any)["BPFRoot"].(string)
			if bpf := mountPath(t, agent, "bpffs"); !strings.HasPrefix(root, bpf+"/") {
				t.Errorf("agent BPFRoot %q is not under the bpffs mount %q", root, bpf)
			}
			r.want(t, "agent/agent", "kubernetes.hostProc", mountPath(t, agent, "host-proc"))
		},
	},
	{
		values: []string{"hostPaths.ztunnel"},
		set:    "hostPaths: {ztunnel: /run/zt}",
		check: func(t *testing.T, r *render) {
			// Agent and proxy meet at one socket: the same host dir, the
			// same file name under their mounts of it.
			var socks []string
			for _, c := range []struct{ ds, key string }{{"agent", "config.ZDSPath"}, {"proxy", "config.ZDSPath"}} {
				spec := r.daemonSet(t, c.ds).Spec.Template.Spec
				r.wantHostPath(t, spec, "ztunnel", "/run/zt")
				sock := lookup(t, r.config(t, c.ds+"/"+c.ds), c.key).(string)
				dir := mountPath(t, container(t, spec, c.ds), "ztunnel")
				if path.Dir(sock) != dir {
					t.Errorf("%s ZDS socket %q is not in its ztunnel mount %q", c.ds, sock, dir)
				}
				socks = append(socks, path.Base(sock))
			}
			if socks[0] != socks[1] {
				t.Errorf("agent serves ZDS on %q, the proxy dials %q", socks[0], socks[1])
			}
		},
	},
	{
		values: []string{"hostPaths.agentRun"},
		set:    "hostPaths: {agentRun: /run/ambpf-x}",
		check: func(t *testing.T, r *render) {
			spec := r.daemonSet(t, "agent").Spec.Template.Spec
			r.wantHostPath(t, spec, "agent-run", "/run/ambpf-x")
			// ambpf-cni runs on the host: the agent's socket must have the
			// same path inside the agent's mount as on the host.
			if mp := mountPath(t, container(t, spec, "agent"), "agent-run"); mp != "/run/ambpf-x" {
				t.Errorf("agent-run mounted at %q, want the host path", mp)
			}
			r.want(t, "agent/agent", "config.APISocket", "/run/ambpf-x/agent.sock")
			for _, c := range cniInstallRuns {
				r.want(t, c, "config.Plugin.agent_socket", "/run/ambpf-x/agent.sock")
			}
		},
	},
	{
		values: []string{"hostPaths.agentState"},
		set:    "hostPaths: {agentState: /data/ambpf}",
		check: func(t *testing.T, r *render) {
			spec := r.daemonSet(t, "agent").Spec.Template.Spec
			r.wantHostPath(t, spec, "agent-state", "/data/ambpf")
			r.want(t, "agent/agent", "config.StateDir", mountPath(t, container(t, spec, "agent"), "agent-state"))
		},
	},
	{
		values: []string{"agent.privileged"},
		set:    "agent: {privileged: true}",
		check: func(t *testing.T, r *render) {
			spec := r.daemonSet(t, "agent").Spec.Template.Spec
			c := container(t, spec, "agent")
			if sc := c.SecurityContext; sc == nil || sc.Privileged == nil || !*sc.Privileged {
				t.Errorf("agent not privileged: %+v", sc)
			}
			for _, m := range c.VolumeMounts {
				if m.Name == "bpffs" && (m.MountPropagation == nil || *m.MountPropagation != corev1.MountPropagationBidirectional) {
					t.Errorf("bpffs propagation %v, want Bidirectional", m.MountPropagation)
				}
			}
		},
	},
	{
		values: []string{"agent.attachMode"},
		set:    "agent: {attachMode: clsact}",
		check: func(t *testing.T, r *render) {
			r.want(t, "agent/agent", "mode", "clsact")
		},
	},
	podSpecCase("agent"),
	podSpecCase("proxy"),
	{
		values: []string{"ca.port", "ca.replicas", "ca.maxCertLifetime"},
		set:    "ca: {port: 15999, replicas: 2, maxCertLifetime: 48h}",
		check: func(t *testing.T, r *render) {
			r.want(t, "ca/ca", "Listen", ":15999")
			r.want(t, "ca/ca", "MaxLifetime", 48*time.Hour)
			r.want(t, "proxy/proxy", "ca.Address", "ambpf-ca."+renderNamespace+".svc:15999")
			if d := r.deployment(t, "ca"); d.Spec.Replicas == nil || *d.Spec.Replicas != 2 {
				t.Errorf("CA replicas %v", d.Spec.Replicas)
			}
			var svc corev1.Service
			for _, o := range r.objects(t, "Service") {
				convert(t, o, &svc)
			}
			if svc.Name != "ambpf-ca" || len(svc.Spec.Ports) != 1 || svc.Spec.Ports[0].Port != 15999 {
				t.Errorf("CA Service %s ports %+v, want 15999", svc.Name, svc.Spec.Ports)
			}
		},
	},
	{
		values: []string{"ca.namespace"},
		set:    "ca: {namespace: mesh-ca}",
		check: func(t *testing.T, r *render) {
			// The CA and its key in a namespace of their own; the proxies
			// find it there.
			r.want(t, "proxy/proxy", "ca.Address", "ambpf-ca.mesh-ca.svc:15012")
			for _, kind := range []string{"Deployment", "Service", "Secret", "ServiceAccount"} {
				for _, o := range r.objects(t, kind) {
					var obj struct {
						Metadata metav1.ObjectMeta `json:"metadata"`
					}
					convert(t, o, &obj)
					if m := obj.Metadata; strings.HasPrefix(m.Name, "ambpf-ca") && m.Namespace != "mesh-ca" {
						t.Errorf("%s %s in namespace %q, want mesh-ca", kind, m.Name, m.Namespace)
					}
				}
			}
		},
	},
	{
		values: []string{"ca.clusterIP"},
		set:    "ca: {clusterIP: 10.96.0.50}",
		check: func(t *testing.T, r *render) {
			// Dialled by address, checked for the Service's name.
			r.want(t, "proxy/proxy", "ca.Address", "10.96.0.50:15012")
			r.want(t, "proxy/proxy", "ca.ServerName", "ambpf-ca."+renderNamespace+".svc")
			var svc corev1.Service
			for _, o := range r.objects(t, "Service") {
				convert(t, o, &svc)
			}
			if svc.Spec.ClusterIP != "10.96.0.50" {
				t.Errorf("CA Service clusterIP %q, want 10.96.0.50", svc.Spec.ClusterIP)
			}
		},
	},
	{
		values: []string{"ca.resources", "ca.nodeSelector"},
		set:    "ca: {resources: {requests: {cpu: 7m}}, nodeSelector: {pool: control}}",
		check: func(t *testing.T, r *render) {
			spec := r.deployment(t, "ca").Spec.Template.Spec
			if res := container(t, spec, "ca").Resources; res.Requests.Cpu().String() != "7m" {
				t.Errorf("CA resources %+v", res)
			}
			if !maps.Equal(spec.NodeSelector, map[string]string{"pool": "control", "kubernetes.io/os": "linux"}) {
				t.Errorf("CA nodeSelector %v", spec.NodeSelector)
			}
		},
	},
	{
		values: []string{"proxy.dnsUpstream"},
		set:    "proxy: {dnsUpstream: '10.96.0.10,[fd00::a]:5353'}",
		check: func(t *testing.T, r *render) {
			r.want(t, "proxy/proxy", "config.DNSUpstreams", []string{"10.96.0.10:53", "[fd00::a]:5353"})
		},
	},
	{
		values: []string{"proxy.drainSeconds"},
		set:    "proxy: {drainSeconds: 40}",
		check: func(t *testing.T, r *render) {
			r.want(t, "proxy/proxy", "config.DrainTimeout", 40*time.Second)
			// The kubelet's SIGKILL comes after the drain, never during it.
			d := r.daemonSet(t, "proxy")
			if g := d.Spec.Template.Spec.TerminationGracePeriodSeconds; g == nil || *g != 45 {
				t.Errorf("proxy terminationGracePeriodSeconds %v, want 45 (the drain plus 5)", g)
			}
			// By default a rollout starts the new proxy before it stops
			// the old one.
			if ru := d.Spec.UpdateStrategy.RollingUpdate; ru == nil || ru.MaxSurge == nil || ru.MaxSurge.String() != "1" ||
				ru.MaxUnavailable == nil || ru.MaxUnavailable.String() != "0" {
				t.Errorf("proxy update strategy %+v, want maxSurge 1, maxUnavailable 0", d.Spec.UpdateStrategy)
			}
		},
	},
	{
		values: []string{"proxy.rollingUpdate"},
		set:    "proxy: {rollingUpdate: {maxSurge: 0, maxUnavailable: 1}}",
		check: func(t *testing.T, r *render) {
			ru := r.daemonSet(t, "proxy").Spec.UpdateStrategy.RollingUpdate
			if ru == nil || ru.MaxSurge == nil || ru.MaxSurge.String() != "0" || ru.MaxUnavailable == nil || ru.MaxUnavailable.String() != "1" {
				t.Errorf("proxy rollingUpdate %+v, want maxSurge 0, maxUnavailable 1", ru)
			}
		},
	},
}

// cniInstallRuns are the three runs of ambpf-cni-install in the agent
// pod: the init container, the watching container and its preStop hook.
var cniInstallRuns = []string{"agent/cni-install", "agent/cni", "agent/cni:preStop"}

// podSpecCase covers the values of one DaemonSet that Kubernetes, not a
// binary, consumes.
func podSpecCase(ds string) chartCase {
	return chartCase{
		values: []string{ds + ".resources", ds + ".priorityClassName", ds + ".nodeSelector", ds + ".tolerations", ds + ".podAnnotations"},
		set: ds + `:
  resources: {requests: {cpu: 7m, memory: 77Mi}, limits: {memory: 777Mi}}
  priorityClassName: mesh-critical
  nodeSelector: {pool: mesh}
  tolerations: [{key: dedicated, operator: Equal, value: mesh, effect: NoSchedule}]
  podAnnotations: {example.org/owner: mesh-team}
`,
		check: func(t *testing.T, r *render) {
			d := r.daemonSet(t, ds)
			spec := d.Spec.Template.Spec
			res := container(t, spec, ds).Resources
			if res.Requests.Cpu().String() != "7m" || res.Requests.Memory().String() != "77Mi" || res.Limits.Memory().String() != "777Mi" {
				t.Errorf("%s resources %+v", ds, res)
			}
			if spec.PriorityClassName != "mesh-critical" {
				t.Errorf("%s priorityClassName %q", ds, spec.PriorityClassName)
			}
			// Helm merges maps: the default kubernetes.io/os stays.
			if !maps.Equal(spec.NodeSelector, map[string]string{"pool": "mesh", "kubernetes.io/os": "linux"}) {
				t.Errorf("%s nodeSelector %v", ds, spec.NodeSelector)
			}
			if len(spec.Tolerations) != 1 || spec.Tolerations[0].Key != "dedicated" || spec.Tolerations[0].Effect != corev1.TaintEffectNoSchedule {
				t.Errorf("%s tolerations %+v", ds, spec.Tolerations)
			}
			if d.Spec.Template.Annotations["example.org/owner"] != "mesh-team" {
				t.Errorf("%s pod annotations %v", ds, d.Spec.Template.Annotations)
			}
			// Added annotations keep the proxy's Prometheus ones.
			if ds == "proxy" && d.Spec.Template.Annotations["prometheus.io/scrape"] != "true" {
				t.Errorf("proxy pod annotations %v lost prometheus.io/scrape", d.Spec.Template.Annotations)
			}
		},
	}
}

// TestChartValuesReachBinaries renders the chart once with its defaults
// and once per value with a non-default setting, starts every binary of
// the rendered pods (ambpf-agent, ambpf-proxy, the three runs of
// ambpf-cni-install) with exactly the container's command, args and env
// plus --print-config, and checks that what the binary parsed holds the
// value. A variable that names no flag makes a binary exit non-zero, so
// every render also proves the chart sets no unknown variable.
func TestChartValuesReachBinaries(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), buildTimeout)
	defer cancel()
	kubeBin, err := EnsureBinaries(ctx)
	if err != nil {
		failOrSkip(t, fmt.Errorf("%w: %w", errBuild, err))
	}
	bins := buildChartBinaries(t)
	chart := chartDir(t)

	t.Run("every value has a case", func(t *testing.T) {
		raw, err := os.ReadFile(filepath.Join(chart, "values.yaml"))
		if err != nil {
			t.Fatal(err)
		}
		var values map[string]any
		if err := yaml.Unmarshal(raw, &values); err != nil {
			t.Fatal(err)
		}
		var covered []string
		for _, c := range chartCases {
			covered = append(covered, c.values...)
		}
		for _, leaf := range valueLeaves("", values) {
			if !slices.ContainsFunc(covered, func(c string) bool { return leaf == c || strings.HasPrefix(leaf, c+".") }) {
				t.Errorf("chart value %s has no case in chartCases: add one that sets it and checks where it arrives", leaf)
			}
		}
	})

	t.Run("defaults", func(t *testing.T) {
		r := renderChart(t, ctx, kubeBin, bins, chart, "")
		appVersion := chartAppVersion(t, chart)
		for _, c := range r.allContainers() {
			if !strings.HasSuffix(c.c.Image, ":"+appVersion) {
				t.Errorf("%s: image %q, want tag appVersion %s", c.name, c.c.Image, appVersion)
			}
		}
		// The proxy watches the API in-cluster (Services, policies, peers
		// on other nodes) and is PERMISSIVE unless told otherwise.
		r.want(t, "proxy/proxy", "config.Kubernetes", "in-cluster")
		r.want(t, "proxy/proxy", "config.MTLSMode", "PERMISSIVE")
		// ztunnel's admin endpoint, on loopback of the proxy's pod.
		r.want(t, "proxy/proxy", "config.AdminAddr", "127.0.0.1:15000")
		// DNS is captured by default, as istio-cni does.
		r.want(t, "proxy/proxy", "config.DNSCapture", true)
		r.want(t, "agent/agent", "kubernetes.dnsCapture", true)
		// The fast path is off unless asked for (docs/BENCHMARKS.md).
		r.want(t, "agent/agent", "config.FastPath", "off")
		r.want(t, "agent/agent", "config.FastPathOptIn", false)
		r.want(t, "proxy/proxy", "config.FastPath", false)
		for _, c := range cniInstallRuns {
			r.want(t, c, "config.Plugin.dns_capture", true)
		}
		// Certificates by CSR from the CA Service with a projected token
		// of audience istio-ca and the published root; no CA key mounted.
		r.want(t, "proxy/proxy", "ca.Address", "ambpf-ca."+renderNamespace+".svc:15012")
		r.want(t, "ca/ca", "TrustedAccounts", []string{renderNamespace + "/ambpf-proxy"})
		r.want(t, "ca/ca", "Audiences", []string{"istio-ca"})
		r.noSecretMounted(t, "proxy")
		// Kubernetes' Service variables would name no flag (AMBPF_CA_SERVICE_HOST
		// from the ambpf-ca Service) and stop the binaries at start.
		for name, spec := range map[string]corev1.PodSpec{
			"agent": r.daemonSet(t, "agent").Spec.Template.Spec, "proxy": r.daemonSet(t, "proxy").Spec.Template.Spec,
			"ca": r.deployment(t, "ca").Spec.Template.Spec,
		} {
			if spec.EnableServiceLinks == nil || *spec.EnableServiceLinks {
				t.Errorf("%s: enableServiceLinks not false", name)
			}
		}
		pspec := r.daemonSet(t, "proxy").Spec.Template.Spec
		tok := volume(t, pspec, "istio-token")
		if p := tok.Projected; p == nil || len(p.Sources) != 1 || p.Sources[0].ServiceAccountToken == nil || p.Sources[0].ServiceAccountToken.Audience != "istio-ca" {
			t.Errorf("proxy token volume %+v, want a projected token of audience istio-ca", tok.VolumeSource)
		} else {
			r.want(t, "proxy/proxy", "ca.TokenFile", mountPath(t, container(t, pspec, "proxy"), "istio-token")+"/"+p.Sources[0].ServiceAccountToken.Path)
		}
		if root := volume(t, pspec, "ca-root"); root.ConfigMap == nil || root.ConfigMap.Name != "istio-ca-root-cert" {
			t.Errorf("proxy root volume %+v, want ConfigMap istio-ca-root-cert", root.VolumeSource)
		}
		r.want(t, "proxy/proxy", "ca.RootFile", mountPath(t, container(t, pspec, "proxy"), "ca-root")+"/root-cert.pem")
		// The agent runs in Kubernetes mode for its node, knows its own
		// pod, and serves readiness where the probe asks.
		r.want(t, "agent/agent", "kubernetes.nodeName", fakeNodeName)
		r.want(t, "agent/agent", "kubernetes.self", renderNamespace+"/"+fakePodName)
		r.want(t, "agent/agent", "kubernetes.excludedNamespaces", []string{"kube-system"})
		r.want(t, "agent/agent", "mode", "")
		agent := container(t, r.daemonSet(t, "agent").Spec.Template.Spec, "agent")
		if p := agent.ReadinessProbe.HTTPGet; p == nil || r.config(t, "agent/agent")["config"].(map[string]any)["ReadyAddr"] != fmt.Sprintf("%s:%d", p.Host, p.Port.IntValue()) {
			t.Errorf("agent readiness probe %+v does not ask the agent's ready address", agent.ReadinessProbe)
		}
		// Prometheus scrapes the proxy as Istio's ztunnel chart has it:
		// the port the binary serves its metrics on, a path it serves.
		pann := r.daemonSet(t, "proxy").Spec.Template.Annotations
		if addr := r.config(t, "proxy/proxy")["config"].(map[string]any)["MetricsAddr"]; pann["prometheus.io/scrape"] != "true" ||
			addr != ":"+pann["prometheus.io/port"] || pann["prometheus.io/path"] != metrics.MetricsPath {
			t.Errorf("proxy pod annotations %v: want prometheus.io/scrape true, port of %v, path %s", pann, addr, metrics.MetricsPath)
		}
		proxy := container(t, r.daemonSet(t, "proxy").Spec.Template.Spec, "proxy")
		if p := proxy.ReadinessProbe.HTTPGet; p == nil || r.config(t, "proxy/proxy")["config"].(map[string]any)["ReadyAddr"] != fmt.Sprintf(":%d", p.Port.IntValue()) {
			t.Errorf("proxy readiness probe %+v does not ask the proxy's ready address", proxy.ReadinessProbe)
		}
		// Only the preStop run uninstalls, and only when the agent
		// DaemonSet is gone; only the cni container watches.
		r.want(t, "agent/cni-install", "watch", false)
		r.want(t, "agent/cni", "watch", true)
		r.want(t, "agent/cni:preStop", "uninstall", true)
		r.want(t, "agent/cni:preStop", "ifDaemonSetGone", renderNamespace+"/ambpf-agent")
		// The agent watches the same DaemonSet, to unenrol its pods on
		// an uninstall.
		r.want(t, "agent/agent", "kubernetes.daemonSet", renderNamespace+"/ambpf-agent")
	})

	for _, c := range chartCases {
		t.Run(strings.Join(c.values, "+"), func(t *testing.T) {
			c.check(t, renderChart(t, ctx, kubeBin, bins, chart, c.set))
		})
	}
}

// TestChartUnknownVariableFailsStartup: a variable the binary does not
// know, added to a rendered container, makes the binary refuse to start
// and name it, so the consistency test above cannot pass over one.
func TestChartUnknownVariableFailsStartup(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), buildTimeout)
	defer cancel()
	kubeBin, err := EnsureBinaries(ctx)
	if err != nil {
		failOrSkip(t, fmt.Errorf("%w: %w", errBuild, err))
	}
	r := renderChart(t, ctx, kubeBin, buildChartBinaries(t), chartDir(t), "")
	for _, c := range []struct{ run, env string }{
		{"proxy/proxy", "AMBPF_PROXY_EXCLUDED_NAMESPACES=kube-system"},
		{"agent/agent", "AMBPF_AGENT_SOCKETS=/x"},
	} {
		_, err := r.start(c.run, c.env)
		if err == nil || !strings.Contains(err.Error(), strings.SplitN(c.env, "=", 2)[0]+" names no flag") {
			t.Errorf("%s with %s: %v, want a startup error naming it", c.run, c.env, err)
		}
	}
}

// render is one helm template output and the binaries to run its pods'
// commands with.
type render struct {
	docs    []map[string]any
	bins    string
	mu      sync.Mutex
	configs map[string]map[string]any // run → --print-config output
}

type namedContainer struct {
	name string // ds/container
	c    corev1.Container
}

func renderChart(t *testing.T, ctx context.Context, kubeBin, bins, chart, values string) *render {
	t.Helper()
	dir := t.TempDir()
	args := []string{"template", "ambpf", chart, "--namespace", renderNamespace}
	if values != "" {
		f := filepath.Join(dir, "values.yaml")
		if err := os.WriteFile(f, []byte(values), 0o644); err != nil {
			t.Fatal(err)
		}
		args = append(args, "-f", f)
	}
	cmd := exec.CommandContext(ctx, filepath.Join(kubeBin, "helm"), args...)
	cmd.Env = append(os.Environ(), "HELM_CACHE_HOME="+dir, "HELM_CONFIG_HOME="+dir, "HELM_DATA_HOME="+dir)
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		t.Fatalf("helm %s: %v\n%s", strings.Join(args, " "), err, stderr.String())
	}
	r := &render{bins: bins, configs: map[string]map[string]any{}}
	dec := utilyaml.NewYAMLOrJSONDecoder(bytes.NewReader(out), 4096)
	for {
		var doc map[string]any
		if err := dec.Decode(&doc); errors.Is(err, io.EOF) {
			break
		} else if err != nil {
			t.Fatalf("decode rendered manifest: %v", err)
		}
		if doc != nil {
			r.docs = append(r.docs, doc)
		}
	}
	// Every run of every binary starts with what the chart gives it.
	for _, run := range r.allRuns() {
		c, err := r.start(run)
		if err != nil {
			t.Fatalf("does not start with the rendered pod spec: %v", err)
		}
		r.configs[run] = c
	}
	return r
}

// objects returns the rendered objects of kind.
func (r *render) objects(t *testing.T, kind string) []map[string]any {
	var out []map[string]any
	for _, d := range r.docs {
		if d["kind"] == kind {
			out = append(out, d)
		}
	}
	return out
}

// daemonSet returns the rendered DaemonSet ambpf-<component>.
func (r *render) daemonSet(t *testing.T, component string) *appsv1.DaemonSet {
	t.Helper()
	for _, d := range r.objects(t, "DaemonSet") {
		var ds appsv1.DaemonSet
		convert(t, d, &ds)
		if ds.Name == "ambpf-"+component {
			return &ds
		}
	}
	t.Fatalf("no DaemonSet ambpf-%s rendered", component)
	return nil
}

// deployment returns the rendered Deployment ambpf-<component>.
func (r *render) deployment(t *testing.T, component string) *appsv1.Deployment {
	t.Helper()
	for _, d := range r.objects(t, "Deployment") {
		var dep appsv1.Deployment
		convert(t, d, &dep)
		if dep.Name == "ambpf-"+component {
			return &dep
		}
	}
	t.Fatalf("no Deployment ambpf-%s rendered", component)
	return nil
}

// noSecretMounted fails if the DaemonSet mounts any Secret: the CA key
// must live only in the CA Deployment.
func (r *render) noSecretMounted(t *testing.T, ds string) {
	t.Helper()
	for _, v := range r.daemonSet(t, ds).Spec.Template.Spec.Volumes {
		if v.Secret != nil {
			t.Errorf("%s mounts Secret %s (volume %s)", ds, v.Secret.SecretName, v.Name)
		}
		if v.Projected != nil {
			for _, src := range v.Projected.Sources {
				if src.Secret != nil {
					t.Errorf("%s projects Secret %s (volume %s)", ds, src.Secret.Name, v.Name)
				}
			}
		}
	}
}

// caCert parses the generated CA Secret's certificate.
func (r *render) caCert(t *testing.T) *x509.Certificate {
	t.Helper()
	secrets := r.objects(t, "Secret")
	if len(secrets) != 1 {
		t.Fatalf("%d Secrets rendered, want the CA", len(secrets))
	}
	var s corev1.Secret
	convert(t, secrets[0], &s)
	block, _ := pem.Decode(s.Data["ca.crt"])
	if block == nil {
		t.Fatalf("CA Secret %s: ca.crt is not PEM", s.Name)
	}
	cert, err := x509.ParseCertificate(block.Bytes)
	if err != nil {
		t.Fatal(err)
	}
	return cert
}

func (r *render) allContainers() []namedContainer {
	var out []namedContainer
	for _, d := range r.docs {
		// DaemonSets and Deployments: the pod template is at the same path.
		if d["kind"] != "DaemonSet" && d["kind"] != "Deployment" {
			continue
		}
		var ds appsv1.DaemonSet
		b, _ := json.Marshal(d)
		if json.Unmarshal(b, &ds) != nil {
			continue
		}
		comp := strings.TrimPrefix(ds.Name, "ambpf-")
		for _, c := range slices.Concat(ds.Spec.Template.Spec.InitContainers, ds.Spec.Template.Spec.Containers) {
			out = append(out, namedContainer{comp + "/" + c.Name, c})
		}
	}
	return out
}

// allRuns names every command the pods run: ds/container, and
// ds/container:preStop for an exec preStop hook.
func (r *render) allRuns() []string {
	var out []string
	for _, c := range r.allContainers() {
		out = append(out, c.name)
		if l := c.c.Lifecycle; l != nil && l.PreStop != nil && l.PreStop.Exec != nil {
			out = append(out, c.name+":preStop")
		}
	}
	return out
}

// config returns what the run's binary printed with --print-config, or
// the error it exited with.
func (r *render) config(t *testing.T, run string) map[string]any {
	t.Helper()
	r.mu.Lock()
	defer r.mu.Unlock()
	if c, ok := r.configs[run]; ok {
		return c
	}
	c, err := r.start(run)
	if err != nil {
		t.Fatal(err)
	}
	r.configs[run] = c
	return c
}

// start runs the command of run (ds/container[:preStop]) as the kubelet
// would: the image's binary, the container's args, only the container's
// env (fieldRefs filled in), with --print-config appended; extraEnv is
// added to the env.
func (r *render) start(run string, extraEnv ...string) (map[string]any, error) {
	name, hook, _ := strings.Cut(run, ":")
	var nc *namedContainer
	for _, c := range r.allContainers() {
		if c.name == name {
			nc = &c
			break
		}
	}
	if nc == nil {
		return nil, fmt.Errorf("no container %s rendered", name)
	}
	argv := slices.Concat(nc.c.Command, nc.c.Args)
	if hook == "preStop" {
		argv = nc.c.Lifecycle.PreStop.Exec.Command
	}
	if len(argv) == 0 {
		return nil, fmt.Errorf("%s: no command", run)
	}
	env := slices.Clone(extraEnv)
	for _, e := range nc.c.Env {
		v := e.Value
		if e.ValueFrom != nil {
			if e.ValueFrom.FieldRef == nil {
				return nil, fmt.Errorf("%s: env %s from %+v: only fieldRef is simulated", run, e.Name, e.ValueFrom)
			}
			switch e.ValueFrom.FieldRef.FieldPath {
			case "spec.nodeName":
				v = fakeNodeName
			case "metadata.name":
				v = fakePodName
			case "metadata.namespace":
				v = renderNamespace
			default:
				return nil, fmt.Errorf("%s: env %s: fieldRef %s not simulated", run, e.Name, e.ValueFrom.FieldRef.FieldPath)
			}
		}
		env = append(env, e.Name+"="+v)
	}
	cmd := exec.Command(filepath.Join(r.bins, argv[0]), append(argv[1:], "--print-config")...)
	cmd.Env = env
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		return nil, fmt.Errorf("%s: %q: %w: %s", run, argv, err, stderr.String())
	}
	var c map[string]any
	if err := json.Unmarshal(out, &c); err != nil {
		return nil, fmt.Errorf("%s: --print-config output: %w\n%s", run, err, out)
	}
	return c, nil
}

// want asserts that the run's parsed configuration has want at key
// (dot-separated), compared as JSON.
func (r *render) want(t *testing.T, run, key string, want any) {
	t.Helper()
	got := lookup(t, r.config(t, run), key)
	b, err := json.Marshal(want)
	if err != nil {
		t.Fatal(err)
	}
	var w any
	if err := json.Unmarshal(b, &w); err != nil {
		t.Fatal(err)
	}
	if !reflect.DeepEqual(got, w) {
		t.Errorf("%s: %s = %v, want %v", run, key, got, w)
	}
}

func (r *render) wantHostPath(t *testing.T, spec corev1.PodSpec, vol, want string) {
	t.Helper()
	if v := volume(t, spec, vol); v.HostPath == nil || v.HostPath.Path != want {
		t.Errorf("volume %s: %+v, want hostPath %s", vol, v.VolumeSource, want)
	}
}

func lookup(t *testing.T, m map[string]any, key string) any {
	t.Helper()
	var cur any = m
	for _, k := range strings.Split(key, ".") {
		mm, ok := cur.(map[string]any)
		if !ok {
			t.Fatalf("%s: %q is not an object in %v", key, k, cur)
		}
		if cur, ok = mm[k]; !ok {
			t.Fatalf("%s: no %q in %v", key, k, mm)
		}
	}
	return cur
}

func container(t *testing.T, spec corev1.PodSpec, name string) corev1.Container {
	t.Helper()
	for _, c := range slices.Concat(spec.InitContainers, spec.Containers) {
		if c.Name == name {
			return c
		}
	}
	t.Fatalf("no container %s", name)
	return corev1.Container{}
}

func volume(t *testing.T, spec corev1.PodSpec, name string) corev1.Volume {
	t.Helper()
	for _, v := range spec.Volumes {
		if v.Name == name {
			return v
		}
	}
	t.Fatalf("no volume %s", name)
	return corev1.Volume{}
}

func mountPath(t *testing.T, c corev1.Container, vol string) string {
	t.Helper()
	for _, m := range c.VolumeMounts {
		if m.Name == vol {
			return m.MountPath
		}
	}
	t.Fatalf("container %s does not mount %s", c.Name, vol)
	return ""
}

func convert(t *testing.T, in map[string]any, out any) {
	t.Helper()
	b, err := json.Marshal(in)
	if err == nil {
		err = json.Unmarshal(b, out)
	}
	if err != nil {
		t.Fatalf("convert %v: %v", in["kind"], err)
	}
}

// valueLeaves lists the keys of values: maps are walked, anything else
// (scalars, lists, empty maps) is a leaf.
func valueLeaves(prefix string, values map[string]any) []string {
	var out []string
	for k, v := range values {
		key := k
		if prefix != "" {
			key = prefix + "." + k
		}
		if m, ok := v.(map[string]any); ok && len(m) > 0 {
			out = append(out, valueLeaves(key, m)...)
		} else {
			out = append(out, key)
		}
	}
	slices.Sort(out)
	return out
}

func chartAppVersion(t *testing.T, chart string) string {
	t.Helper()
	raw, err := os.ReadFile(filepath.Join(chart, "Chart.yaml"))
	if err != nil {
		t.Fatal(err)
	}
	var c struct {
		AppVersion string `json:"appVersion"`
	}
	if err := yaml.Unmarshal(raw, &c); err != nil || c.AppVersion == "" {
		t.Fatalf("Chart.yaml appVersion: %v", err)
	}
	return c.AppVersion
}

// chartBins holds the image's binaries, built once per test binary and
// removed by TestMain.
var chartBins struct {
	once sync.Once
	dir  string
	err  error
}

// buildChartBinaries builds the binaries the chart's pods run (with the
// shared Go build cache: seconds once built).
func buildChartBinaries(t *testing.T) string {
	t.Helper()
	chartBins.once.Do(func() {
		root, err := repoRoot()
		if err != nil {
			chartBins.err = err
			return
		}
		if chartBins.dir, err = os.MkdirTemp("", "ambpf-chart-bins-"); err != nil {
			chartBins.err = err
			return
		}
		cmd := exec.Command("go", "build", "-o", chartBins.dir+"/", "./cmd/ambpf-agent", "./cmd/ambpf-proxy", "./cmd/ambpf-cni-install", "./cmd/ambpf-ca")
		cmd.Dir = root
		if out, err := cmd.CombinedOutput(); err != nil {
			chartBins.err = fmt.Errorf("go build: %w\n%s", err, out)
		}
	})
	if chartBins.err != nil {
		t.Fatal(chartBins.err)
	}
	return chartBins.dir
}

// removeChartBins removes what buildChartBinaries built.
func removeChartBins() {
	if chartBins.dir != "" {
		os.RemoveAll(chartBins.dir)
	}
}
