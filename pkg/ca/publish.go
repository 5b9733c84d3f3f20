package ca

import (
	"bytes"
	"context"
	"fmt"
	"log/slog"
	"time"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/watch"
	"k8s.io/client-go/kubernetes"
)

// The trust bundle's ConfigMap, Istio's names: ztunnel and sidecars of an
// Istio installation read the same object.
const (
	RootConfigMap = "istio-ca-root-cert"
	RootCertKey   = "root-cert.pem"
)

// Publisher keeps the ConfigMap RootConfigMap, key RootCertKey, holding
// the trust bundle in every namespace: on every namespace it is told of
// by a watch, and in all of them every Resync.
type Publisher struct {
	Kube   kubernetes.Interface
	Roots  []byte // PEM
	Resync time.Duration
	Logger *slog.Logger
}

// Run publishes until ctx ends. Errors are logged and retried at the next
// event or resync.
func (p *Publisher) Run(ctx context.Context) {
	resync := p.Resync
	if resync <= 0 {
		resync = time.Minute
	}
	log := p.Logger
	if log == nil {
		log = slog.Default()
	}
	for ctx.Err() == nil {
		started := time.Now()
		rv, err := p.all(ctx)
		if err != nil {
			log.Error("publish trust bundle", "err", err)
		}
		p.watch(ctx, rv, resync, log)
		// A watch the server ends at once (an expired resource version)
		// must not turn this into a busy loop of lists.
		if d := time.Second - time.Since(started); d > 0 {
			select {
			case <-ctx.Done():
			case <-time.After(d):
			}
		}
	}
}

// all publishes in every namespace and returns the list's resource
// version for the watch.
func (p *Publisher) all(ctx context.Context) (string, error) {
	list, err := p.Kube.CoreV1().Namespaces().List(ctx, metav1.ListOptions{})
	if err != nil {
		return "", fmt.Errorf("list namespaces: %w", err)
	}
	var failed error
	for _, ns := range list.Items {
		if err := p.Ensure(ctx, ns.Name); err != nil {
			failed = err
		}
	}
	return list.ResourceVersion, failed
}

// watch publishes in each namespace added, until resync passes or the
// watch ends.
func (p *Publisher) watch(ctx context.Context, rv string, resync time.Duration, log *slog.Logger) {
	ctx, cancel := context.WithTimeout(ctx, resync)
	defer cancel()
	w, err := p.Kube.CoreV1().Namespaces().Watch(ctx, metav1.ListOptions{ResourceVersion: rv})
	if err != nil {
		log.Error("watch namespaces", "err", err)
		<-ctx.Done()
		return
	}
	defer w.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case ev, ok := <-w.ResultChan():
			if !ok {
				return
			}
			ns, isNS := ev.Object.(*corev1.Namespace)
			if ev.Type != watch.Added || !isNS {
				continue
			}
			if err := p.Ensure(ctx, ns.Name); err != nil {
				log.Error("publish trust bundle", "namespace", ns.Name, "err", err)
			}
		}
	}
}

// Ensure creates or updates the ConfigMap in namespace ns. A namespace
// being deleted refuses new objects; that is not an error.
func (p *Publisher) Ensure(ctx context.Context, ns string) error {
	cms := p.Kube.CoreV1().ConfigMaps(ns)
	cm, err := cms.Get(ctx, RootConfigMap, metav1.GetOptions{})
	if apierrors.IsNotFound(err) {
		_, err = cms.Create(ctx, &corev1.ConfigMap{
			ObjectMeta: metav1.ObjectMeta{Name: RootConfigMap, Labels: map[string]string{"istio.io/config": "true"}},
			Data:       map[string]string{RootCertKey: string(p.Roots)},
		}, metav1.CreateOptions{})
		if apierrors.IsForbidden(err) && isTerminating(err) || apierrors.IsAlreadyExists(err) {
			return nil
		}
	} else if err == nil && !bytes.Equal([]byte(cm.Data[RootCertKey]), p.Roots) {
		cm = cm.DeepCopy()
		if cm.Data == nil {
			cm.Data = map[string]string{}
		}
		cm.Data[RootCertKey] = string(p.Roots)
		_, err = cms.Update(ctx, cm, metav1.UpdateOptions{})
	}
	if err != nil {
		return fmt.Errorf("configmap %s/%s: %w", ns, RootConfigMap, err)
	}
	return nil
}

func isTerminating(err error) bool {
	return apierrors.HasStatusCause(err, corev1.NamespaceTerminatingCause)
}
