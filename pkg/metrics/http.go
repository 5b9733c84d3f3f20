package metrics

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"time"
)

// Istio's default ports and paths for a ztunnel-like proxy.
const (
	// DefaultMetricsAddr serves MetricsPath (Istio's merged stats port).
	DefaultMetricsAddr = ":15020"
	// DefaultReadyAddr serves ReadyPath (ztunnel's readiness port).
	DefaultReadyAddr = ":15021"
	MetricsPath      = "/metrics"
	// StatsPath is Istio's merged-metrics path (what the prometheus.io/path
	// annotation of Istio's pods names); it serves the same exposition.
	StatsPath = "/stats/prometheus"
	ReadyPath = "/healthz/ready"
)

// ReadyHandler answers 200 "ready" while check returns nil and 503 with
// the error text otherwise. check is called on every request and must be
// safe for concurrent use; nil means always ready.
func ReadyHandler(check func() error) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "text/plain; charset=utf-8")
		w.Header().Set("Cache-Control", "no-store")
		if check != nil {
			if err := check(); err != nil {
				w.WriteHeader(http.StatusServiceUnavailable)
				fmt.Fprintf(w, "not ready: %v\n", err)
				return
			}
		}
		fmt.Fprintln(w, "ready")
	})
}

// MetricsMux routes MetricsPath and StatsPath to m's handler.
func (m *Metrics) MetricsMux() *http.ServeMux {
	mux := http.NewServeMux()
	mux.Handle("GET "+MetricsPath, m.Handler())
	mux.Handle("GET "+StatsPath, m.Handler())
	return mux
}

// ReadyMux routes ReadyPath to ReadyHandler(check).
func ReadyMux(check func() error) *http.ServeMux {
	mux := http.NewServeMux()
	mux.Handle("GET "+ReadyPath, ReadyHandler(check))
	return mux
}

// Serve serves h on ln until ctx is done, then shuts the server down
// (waiting up to 5 s for requests in flight) and returns nil; it returns
// the server's error if serving fails first. It closes ln.
func Serve(ctx context.Context, ln net.Listener, h http.Handler) error {
	srv := &http.Server{Handler: h, ReadHeaderTimeout: 10 * time.Second}
	errc := make(chan error, 1)
	go func() { errc <- srv.Serve(ln) }()
	select {
	case err := <-errc:
		return fmt.Errorf("serve %s: %w", ln.Addr(), err)
	case <-ctx.Done():
	}
	sctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	err := srv.Shutdown(sctx)
	if serr := <-errc; serr != nil && !errors.Is(serr, http.ErrServerClosed) {
		err = errors.Join(err, serr)
	}
	if err != nil {
		return fmt.Errorf("shut down %s: %w", ln.Addr(), err)
	}
	return nil
}
