//go:build linux

// Package podwatch is the node agent's Kubernetes mode: it watches the
// pods of its node and all namespaces, decides which pods are in the
// ambient mesh (istio.io/dataplane-mode on the pod or its namespace, with
// the exclusions of the Istio contract), enrols and removes them through
// the agent (agent.Ops), finds the network namespace of a running pod by
// scanning /proc, and writes the ambient.istio.io/redirection status
// annotation. A Watcher is the agent's agent.Controller: the same policy
// decides the CNI plugin's enrolments (Admit), so both ways in agree.
package podwatch

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net/netip"
	"sync"
	"time"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/fields"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/informers"
	"k8s.io/client-go/kubernetes"
	corelisters "k8s.io/client-go/listers/core/v1"
	"k8s.io/client-go/tools/cache"
	"k8s.io/client-go/util/workqueue"

	"github.com/ambpf/ambpf/pkg/agent"
	"github.com/ambpf/ambpf/pkg/agentapi"
)

// Defaults of Config.
const (
	DefaultRetryMin = 200 * time.Millisecond
	DefaultRetryMax = 30 * time.Second
	// DefaultResync re-examines every pod now and then, which repairs
	// an annotation someone removed or a pod whose netns search failed.
	DefaultResync = 5 * time.Minute
	defaultProc   = "/proc"
	opTimeout     = 30 * time.Second
)

// Config configures a Watcher.
type Config struct {
	// Client talks to the API server; required.
	Client kubernetes.Interface
	// NodeName is this node (spec.nodeName of its pods); required.
	NodeName string
	// Policy decides enrolment.
	Policy Policy
	// Finder locates running pods; ProcRoot defaults to /proc.
	Finder Finder
	// RetryMin and RetryMax bound the per-pod exponential retry backoff.
	RetryMin, RetryMax time.Duration
	// Resync is the informers' resync period (DefaultResync).
	Resync time.Duration
	Logger *slog.Logger
}

// Watcher keeps the agent's pods in line with the API. It implements
// agent.Controller; Run may be called once.
type Watcher struct {
	cfg   Config
	log   *slog.Logger
	queue workqueue.TypedRateLimitingInterface[string]

	mu      sync.Mutex
	pods    corelisters.PodLister
	nss     corelisters.NamespaceLister
	podInf  cache.SharedIndexInformer
	running bool
}

var _ agent.Controller = (*Watcher)(nil)

// New checks cfg and prepares a Watcher; it contacts nothing until Run.
func New(cfg Config) (*Watcher, error) {
	if cfg.Client == nil {
		return nil, errors.New("podwatch: no Kubernetes client")
	}
	if cfg.NodeName == "" {
		return nil, errors.New("podwatch: no node name")
	}
	if cfg.Finder.ProcRoot == "" {
		cfg.Finder.ProcRoot = defaultProc
	}
	if cfg.RetryMin <= 0 {
		cfg.RetryMin = DefaultRetryMin
	}
	if cfg.RetryMax < cfg.RetryMin {
		cfg.RetryMax = max(DefaultRetryMax, cfg.RetryMin)
	}
	if cfg.Resync <= 0 {
		cfg.Resync = DefaultResync
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.Default()
	}
	return &Watcher{
		cfg: cfg,
		log: cfg.Logger.With("component", "podwatch", "node", cfg.NodeName),
		queue: workqueue.NewTypedRateLimitingQueueWithConfig(
			workqueue.NewTypedItemExponentialFailureRateLimiter[string](cfg.RetryMin, cfg.RetryMax),
			workqueue.TypedRateLimitingQueueConfig[string]{Name: "podwatch"}),
	}, nil
}

// Run starts the informers (the node's pods, every namespace), waits for
// their caches, brings every pod of the node and every pod the agent
// knows in line once (the restart rebuild), calls synced, then works
// the queue until ctx ends.
func (w *Watcher) Run(ctx context.Context, ops agent.Ops, synced func()) error {
	w.mu.Lock()
	if w.running {
		w.mu.Unlock()
		return errors.New("podwatch: Run called twice")
	}
	w.running = true
	w.mu.Unlock()
	defer w.queue.ShutDown()

	podFactory := informers.NewSharedInformerFactoryWithOptions(w.cfg.Client, w.cfg.Resync,
		informers.WithTweakListOptions(func(o *metav1.ListOptions) {
			o.FieldSelector = fields.OneTermEqualSelector("spec.nodeName", w.cfg.NodeName).String()
		}))
	nsFactory := informers.NewSharedInformerFactory(w.cfg.Client, w.cfg.Resync)
	podInf := podFactory.Core().V1().Pods()
	nsInf := nsFactory.Core().V1().Namespaces()
	w.mu.Lock()
	w.pods, w.nss, w.podInf = podInf.Lister(), nsInf.Lister(), podInf.Informer()
	w.mu.Unlock()

	if _, err := podInf.Informer().AddEventHandler(cache.ResourceEventHandlerFuncs{
		AddFunc:    w.enqueueObj,
		UpdateFunc: func(_, obj any) { w.enqueueObj(obj) },
		DeleteFunc: w.enqueueObj,
	}); err != nil {
		return fmt.Errorf("pod informer: %w", err)
	}
	if _, err := nsInf.Informer().AddEventHandler(cache.ResourceEventHandlerFuncs{
		AddFunc: w.enqueueNamespace,
		UpdateFunc: func(old, obj any) {
			o, n := old.(*corev1.Namespace), obj.(*corev1.Namespace)
			if o.Labels[DataplaneModeLabel] != n.Labels[DataplaneModeLabel] {
				w.enqueueNamespace(obj)
			}
		},
		DeleteFunc: w.enqueueNamespace,
	}); err != nil {
		return fmt.Errorf("namespace informer: %w", err)
	}
	podFactory.Start(ctx.Done())
	nsFactory.Start(ctx.Done())
	defer podFactory.Shutdown()
	defer nsFactory.Shutdown()
	if !cache.WaitForCacheSync(ctx.Done(), podInf.Informer().HasSynced, nsInf.Informer().HasSynced) {
		return ctx.Err()
	}

	// The rebuild: every pod the API or the agent knows, once, before
	// the agent serves its proxies. Failures go to the queue.
	keys := map[string]bool{}
	for _, k := range podInf.Informer().GetStore().ListKeys() {
		keys[k] = true
	}
	for _, st := range ops.Pods() {
		keys[st.Namespace+"/"+st.Name] = true
	}
	for k := range keys {
		if err := w.sync(ctx, ops, k, false); err != nil {
			w.log.Warn("rebuild: pod not in line yet, retrying", "pod", k, "err", err)
		}
		// Annotations are written by the workers, once the proxies are
		// served and can ack.
		w.queue.Add(k)
	}
	w.log.Info("pods rebuilt from the API", "pods", len(keys), "enrolled", len(ops.Pods()))
	synced()

	for w.processNext(ctx, ops) {
	}
	return nil
}

// processNext handles one queued pod; false once the queue shut down.
func (w *Watcher) processNext(ctx context.Context, ops agent.Ops) bool {
	stop := context.AfterFunc(ctx, w.queue.ShutDown)
	defer stop()
	key, quit := w.queue.Get()
	if quit {
		return false
	}
	defer w.queue.Done(key)
	if err := w.sync(ctx, ops, key, true); err != nil {
		if ctx.Err() != nil {
			return false
		}
		w.log.Warn("pod sync failed, retrying", "pod", key, "err", err, "retries", w.queue.NumRequeues(key))
		w.queue.AddRateLimited(key)
		return true
	}
	w.queue.Forget(key)
	return true
}

func (w *Watcher) enqueueObj(obj any) {
	key, err := cache.DeletionHandlingMetaNamespaceKeyFunc(obj)
	if err == nil {
		w.queue.Add(key)
	}
}

// enqueueNamespace queues every pod of the node in the namespace.
func (w *Watcher) enqueueNamespace(obj any) {
	if t, ok := obj.(cache.DeletedFinalStateUnknown); ok {
		obj = t.Obj
	}
	ns, ok := obj.(*corev1.Namespace)
	if !ok {
		return
	}
	w.mu.Lock()
	inf := w.podInf
	w.mu.Unlock()
	objs, err := inf.GetIndexer().ByIndex(cache.NamespaceIndex, ns.Name)
	if err != nil {
		return
	}
	for _, o := range objs {
		w.enqueueObj(o)
	}
}

// sync brings one pod in line: records of the agent for an older pod of
// that name (or a pod gone) are removed keeping their datapath (the pod is
// being deleted), then the pod is enrolled, updated or removed as the
// policy says, and (when annotate) its status annotation is written.
func (w *Watcher) sync(ctx context.Context, ops agent.Ops, key string, annotate bool) error {
	ctx, cancel := context.WithTimeout(ctx, opTimeout)
	defer cancel()
	namespace, name, err := cache.SplitMetaNamespaceKey(key)
	if err != nil {
		return nil // not ours: never queued by this code
	}
	pod, err := w.pods.Pods(namespace).Get(name)
	if apierrors.IsNotFound(err) {
		pod = nil
	} else if err != nil {
		return fmt.Errorf("get pod %s from the cache: %w", key, err)
	}
	var errs []error
	for _, st := range ops.Pods() {
		if st.Namespace == namespace && st.Name == name && (pod == nil || st.UID != string(pod.UID)) {
			w.log.Info("pod gone: removing it from the proxies", "pod", key, "uid", st.UID)
			errs = append(errs, ops.Unenroll(ctx, st.UID, true))
		}
	}
	if pod == nil {
		return errors.Join(errs...)
	}
	uid := string(pod.UID)
	log := w.log.With("pod", key, "uid", uid)
	st, known := ops.Pod(uid)
	if terminal(pod) {
		if known {
			log.Info("pod terminated: removing it from the proxies")
			errs = append(errs, ops.Unenroll(ctx, uid, true))
			known = false
		}
	} else {
		var nsObj *corev1.Namespace
		if n, err := w.nss.Get(namespace); err == nil {
			nsObj = n
		}
		want, reason := w.cfg.Policy.Wants(pod, nsObj)
		dns, bypass := w.cfg.Policy.Options(pod)
		fastPath := w.cfg.Policy.FastPath(pod)
		switch {
		case want && !known:
			req, err := w.runningRequest(pod)
			if errors.Is(err, errNoIP) {
				// Not started yet: its CNI ADD will enrol it.
				break
			}
			if err != nil {
				return errors.Join(append(errs, err)...)
			}
			log.Info("enrolling a running pod", "netns", req.Netns, "cgroup", req.Cgroup)
			if st, err = ops.Enroll(ctx, req); err != nil {
				return errors.Join(append(errs, fmt.Errorf("enrol %s: %w", key, err))...)
			}
			known = true
		case want && known && (st.DNSCapture != dns || st.BypassInbound != bypass || st.FastPath != fastPath):
			req := st.EnrollRequest
			req.DNSCapture, req.BypassInbound, req.FastPath = dns, bypass, fastPath
			log.Info("pod options changed", "dns_capture", dns, "bypass_inbound", bypass, "fast_path", fastPath)
			if st, err = ops.Enroll(ctx, req); err != nil {
				return errors.Join(append(errs, fmt.Errorf("update %s: %w", key, err))...)
			}
		case !want && known:
			log.Info("pod left the mesh", "reason", reason)
			if err := ops.Unenroll(ctx, uid, false); err != nil {
				return errors.Join(append(errs, fmt.Errorf("unenrol %s: %w", key, err))...)
			}
			known = false
		}
	}
	if annotate {
		value := ""
		if known {
			st, known = ops.Pod(uid)
			if known {
				value = st.State
			}
		}
		errs = append(errs, w.annotate(ctx, pod, value))
	}
	return errors.Join(errs...)
}

var errNoIP = errors.New("the pod has no IP yet")

// runningRequest builds the enrolment of a running pod, its netns found
// through /proc.
func (w *Watcher) runningRequest(pod *corev1.Pod) (agentapi.EnrollRequest, error) {
	ips := podIPs(pod)
	if len(ips) == 0 {
		return agentapi.EnrollRequest{}, errNoIP
	}
	path, cg, err := w.cfg.Finder.Netns(string(pod.UID), ips)
	if err != nil {
		return agentapi.EnrollRequest{}, err
	}
	req := agentapi.EnrollRequest{
		UID: string(pod.UID), Name: pod.Name, Namespace: pod.Namespace, ServiceAccount: ServiceAccount(pod),
		Netns: path, IPs: ips, Cgroup: cg,
	}
	req.DNSCapture, req.BypassInbound = w.cfg.Policy.Options(pod)
	req.FastPath = w.cfg.Policy.FastPath(pod)
	return req, nil
}

func podIPs(pod *corev1.Pod) []netip.Addr {
	var out []netip.Addr
	for _, ip := range pod.Status.PodIPs {
		if a, err := netip.ParseAddr(ip.IP); err == nil {
			out = append(out, a)
		}
	}
	if len(out) == 0 && pod.Status.PodIP != "" {
		if a, err := netip.ParseAddr(pod.Status.PodIP); err == nil {
			out = append(out, a)
		}
	}
	return out
}

// annotate sets the redirection annotation to value ("" removes it) with a
// merge patch on pods/status, unless it already says so.
func (w *Watcher) annotate(ctx context.Context, pod *corev1.Pod, value string) error {
	cur, has := pod.Annotations[RedirectionAnnotation]
	if (value == "" && !has) || (value != "" && cur == value) {
		return nil
	}
	var v any // null removes the key in a merge patch
	if value != "" {
		v = value
	}
	patch, err := json.Marshal(map[string]any{
		"metadata": map[string]any{
			"annotations": map[string]any{RedirectionAnnotation: v},
			// Only this incarnation of the pod: a new pod of the same
			// name must not get the old one's status.
			"uid": pod.UID,
		},
	})
	if err != nil {
		return err
	}
	_, err = w.cfg.Client.CoreV1().Pods(pod.Namespace).Patch(ctx, pod.Name, types.MergePatchType, patch, metav1.PatchOptions{}, "status")
	if apierrors.IsNotFound(err) || apierrors.IsConflict(err) {
		return nil // gone, or replaced by a pod of the same name
	}
	if err != nil {
		return fmt.Errorf("annotate %s/%s %s=%q: %w", pod.Namespace, pod.Name, RedirectionAnnotation, value, err)
	}
	w.log.Info("pod annotated", "pod", pod.Namespace+"/"+pod.Name, RedirectionAnnotation, value)
	return nil
}

// Admit implements agent.Controller: the policy decides the CNI plugin's
// enrolment, and the pod's own settings (service account, annotations,
// cgroup) complete the request, so a pod enrolled through CNI is recorded
// exactly as the watcher would record it.
func (w *Watcher) Admit(ctx context.Context, req *agentapi.EnrollRequest) (bool, string, error) {
	pod, err := w.getPod(ctx, req.Namespace, req.Name)
	if err != nil {
		return false, "", err
	}
	if string(pod.UID) != req.UID {
		return false, "", fmt.Errorf("pod %s/%s has UID %s in the API, not %s", req.Namespace, req.Name, pod.UID, req.UID)
	}
	if pod.Spec.NodeName != w.cfg.NodeName {
		return false, "", fmt.Errorf("pod %s/%s runs on node %q, this agent serves %q", req.Namespace, req.Name, pod.Spec.NodeName, w.cfg.NodeName)
	}
	ns, err := w.getNamespace(ctx, req.Namespace)
	if err != nil {
		return false, "", err
	}
	if ok, reason := w.cfg.Policy.Wants(pod, ns); !ok {
		return false, reason, nil
	}
	req.ServiceAccount = ServiceAccount(pod)
	req.DNSCapture, req.BypassInbound = w.cfg.Policy.Options(pod)
	req.FastPath = w.cfg.Policy.FastPath(pod)
	if req.Cgroup == "" {
		if cg, err := w.cfg.Finder.Cgroup(req.UID); err == nil {
			req.Cgroup = cg
		}
	}
	return true, "", nil
}

// getPod reads the pod from the cache, else (a pod created a moment ago)
// from the API.
func (w *Watcher) getPod(ctx context.Context, namespace, name string) (*corev1.Pod, error) {
	w.mu.Lock()
	lister := w.pods
	w.mu.Unlock()
	if lister != nil {
		if p, err := lister.Pods(namespace).Get(name); err == nil {
			return p, nil
		}
	}
	p, err := w.cfg.Client.CoreV1().Pods(namespace).Get(ctx, name, metav1.GetOptions{})
	if err != nil {
		return nil, fmt.Errorf("get pod %s/%s: %w", namespace, name, err)
	}
	return p, nil
}

func (w *Watcher) getNamespace(ctx context.Context, name string) (*corev1.Namespace, error) {
	w.mu.Lock()
	lister := w.nss
	w.mu.Unlock()
	if lister != nil {
		if n, err := lister.Get(name); err == nil {
			return n, nil
		}
	}
	n, err := w.cfg.Client.CoreV1().Namespaces().Get(ctx, name, metav1.GetOptions{})
	if err != nil {
		return nil, fmt.Errorf("get namespace %s: %w", name, err)
	}
	return n, nil
}

// Changed implements agent.Controller: the pod is queued, and its worker
// writes the annotation for the new state.
func (w *Watcher) Changed(st agentapi.PodState, _ bool) {
	if st.Namespace != "" && st.Name != "" {
		w.queue.Add(st.Namespace + "/" + st.Name)
	}
}

// Locate implements agent.Controller with the /proc search.
func (w *Watcher) Locate(st agentapi.PodState) (string, error) {
	path, _, err := w.cfg.Finder.Netns(st.UID, st.IPs)
	return path, err
}
