package kubediscovery

import (
	"context"
	"fmt"
	"log/slog"
	"sync"
	"time"

	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/runtime/schema"
	k8sdiscovery "k8s.io/client-go/discovery"
	"k8s.io/client-go/dynamic"
	"k8s.io/client-go/dynamic/dynamicinformer"
	"k8s.io/client-go/tools/cache"
)

// The Istio resources read here.
var (
	authorizationPolicies = schema.GroupVersionResource{Group: "security.istio.io", Version: "v1", Resource: "authorizationpolicies"}
	peerAuthentications   = schema.GroupVersionResource{Group: "security.istio.io", Version: "v1", Resource: "peerauthentications"}
)

// crdWatch watches one custom resource that may not be installed: while
// its CRD is absent the kind counts as synced and empty, and the API's
// discovery is asked again every poll interval.
type crdWatch struct {
	gvr  schema.GroupVersionResource
	dyn  dynamic.Interface
	disc k8sdiscovery.DiscoveryInterface
	poll time.Duration
	log  *slog.Logger
	kick func()

	mu       sync.Mutex
	absent   bool                      // the last check found no CRD
	informer cache.SharedIndexInformer // nil unless watching
}

// run watches until ctx is done.
func (w *crdWatch) run(ctx context.Context) {
	var lastErr string
	announced := false // "not installed" logged since the last watch
	for ctx.Err() == nil {
		ok, err := w.installed()
		switch {
		case err != nil:
			if err.Error() != lastErr {
				w.log.Warn("cannot tell whether the CRD is installed; retrying", "error", err)
				lastErr = err.Error()
			}
		case !ok:
			if !announced {
				w.log.Info("CRD not installed; serving none of its objects and checking again", "every", w.poll)
				announced = true
			}
			w.setAbsent()
		default:
			lastErr, announced = "", false
			// Returns when the CRD is deleted; the API's discovery may
			// still list it for a moment, hence the wait below.
			w.watch(ctx)
		}
		select {
		case <-ctx.Done():
		case <-time.After(w.poll):
		}
	}
}

// installed asks the API's discovery whether the resource is served.
func (w *crdWatch) installed() (bool, error) {
	list, err := w.disc.ServerResourcesForGroupVersion(w.gvr.GroupVersion().String())
	if apierrors.IsNotFound(err) {
		return false, nil
	}
	if err != nil {
		return false, fmt.Errorf("discover %s: %w", w.gvr.GroupVersion(), err)
	}
	for _, r := range list.APIResources {
		if r.Name == w.gvr.Resource {
			return true, nil
		}
	}
	return false, nil
}

func (w *crdWatch) setAbsent() {
	w.mu.Lock()
	changed := !w.absent
	w.absent = true
	w.mu.Unlock()
	if changed {
		w.kick()
	}
}

// watch runs an informer until ctx is done or the resource disappears
// (a list answered 404: the CRD was deleted).
func (w *crdWatch) watch(ctx context.Context) {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	inf := dynamicinformer.NewFilteredDynamicInformer(w.dyn, w.gvr, "", 0, cache.Indexers{}, nil).Informer()
	// Errors cannot happen before Run; they would only mean a bug here.
	_ = inf.SetTransform(stripManagedFields)
	_ = inf.SetWatchErrorHandlerWithContext(func(_ context.Context, _ *cache.Reflector, err error) {
		if apierrors.IsNotFound(err) {
			w.log.Info("CRD removed; serving none of its objects")
			cancel()
			return
		}
		w.log.Warn("watch failed; retrying", "error", err)
	})
	if _, err := inf.AddEventHandler(kickHandler(w.kick)); err != nil {
		w.log.Error("add event handler", "error", err)
		return
	}
	w.mu.Lock()
	w.informer, w.absent = inf, false
	w.mu.Unlock()
	w.log.Info("watching")
	inf.RunWithContext(ctx)
	w.mu.Lock()
	w.informer = nil
	w.mu.Unlock()
	w.kick()
}

// synced reports whether the kind's content is known: the CRD is absent,
// or its informer listed everything.
func (w *crdWatch) synced() bool {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.absent || (w.informer != nil && w.informer.HasSynced())
}

// list returns the cached objects (none while the CRD is absent).
func (w *crdWatch) list() []*unstructured.Unstructured {
	w.mu.Lock()
	inf := w.informer
	w.mu.Unlock()
	if inf == nil {
		return nil
	}
	var out []*unstructured.Unstructured
	for _, o := range inf.GetStore().List() {
		if u, ok := o.(*unstructured.Unstructured); ok {
			out = append(out, u)
		}
	}
	return out
}
