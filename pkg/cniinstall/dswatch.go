package cniinstall

import (
	"context"
	"errors"
	"fmt"
	"sync/atomic"

	appsv1 "k8s.io/api/apps/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/fields"
	"k8s.io/client-go/informers"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/tools/cache"
)

// DaemonSetWatch follows one DaemonSet for the life of one of its pods,
// so that the pod can tell at its end whether the DaemonSet was deleted
// (an uninstall) or is only replacing the pod (a rollout, a drain) even
// when its credentials are gone by then: helm uninstall deletes the Role,
// the RoleBinding and the ServiceAccount right after the DaemonSet, before
// the garbage collector's deletion of the pod reaches the kubelet, so a
// question asked only at the end is usually refused. It needs get, list
// and watch on that one DaemonSet.
type DaemonSetWatch struct {
	client          kubernetes.Interface
	namespace, name string
	// seen: the DaemonSet was there once; deleted: then it was deleted
	// or marked for deletion.
	seen, deleted atomic.Bool
}

// WatchDaemonSet starts watching namespace/name until ctx ends. It returns
// at once; Gone answers from what the watch saw, and asks the API server
// (DaemonSetGone) when the watch saw no deletion.
func WatchDaemonSet(ctx context.Context, client kubernetes.Interface, namespace, name string) (*DaemonSetWatch, error) {
	w := &DaemonSetWatch{client: client, namespace: namespace, name: name}
	f := informers.NewSharedInformerFactoryWithOptions(client, 0, informers.WithNamespace(namespace),
		informers.WithTweakListOptions(func(o *metav1.ListOptions) {
			o.FieldSelector = fields.OneTermEqualSelector("metadata.name", name).String()
		}))
	observe := func(obj any) {
		if ds, ok := obj.(*appsv1.DaemonSet); ok && ds.Name == name {
			w.seen.Store(true)
			if ds.DeletionTimestamp != nil {
				w.deleted.Store(true)
			}
		}
	}
	_, err := f.Apps().V1().DaemonSets().Informer().AddEventHandler(cache.ResourceEventHandlerFuncs{
		AddFunc:    observe,
		UpdateFunc: func(_, obj any) { observe(obj) },
		DeleteFunc: func(obj any) {
			if t, ok := obj.(cache.DeletedFinalStateUnknown); ok {
				obj = t.Obj
			}
			if ds, ok := obj.(*appsv1.DaemonSet); ok && ds.Name == name {
				w.seen.Store(true)
				w.deleted.Store(true)
			}
		},
	})
	if err != nil {
		return nil, fmt.Errorf("watch daemonset %s/%s: %w", namespace, name, err)
	}
	f.Start(ctx.Done())
	return w, nil
}

// errNeverSeen: the watch never saw the DaemonSet, so a misnamed one
// cannot be taken for a deleted one.
var errNeverSeen = errors.New("the watch never saw it")

// Gone reports whether the DaemonSet was deleted or is being deleted, as
// the watch saw it or, failing that, as the API server answers now. A
// DaemonSet the watch never saw is never gone (a wrong name must not look
// like an uninstall). When it cannot tell it returns false and the
// error: the caller keeps what a restart needs.
func (w *DaemonSetWatch) Gone(ctx context.Context) (bool, error) {
	if w.deleted.Load() {
		return true, nil
	}
	gone, err := DaemonSetGone(ctx, w.client, w.namespace, w.name)
	if err != nil {
		return false, err
	}
	if gone && !w.seen.Load() {
		return false, fmt.Errorf("daemonset %s/%s is absent but %w", w.namespace, w.name, errNeverSeen)
	}
	return gone, nil
}
