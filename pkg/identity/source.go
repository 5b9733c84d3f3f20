package identity

import (
	"crypto"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"sync"
	"sync/atomic"
	"time"
)

// Issuer signs workload certificates. *CA is one; a remote CA client
// (pkg/caclient, speaking Istio's certificate service) is another.
type Issuer interface {
	// IssueKey returns the certificate for id and key's public key
	// followed by its intermediates (not the root). It is given the
	// private key because a remote CA takes a certificate signing
	// request, which the key signs; an issuer never keeps the key.
	IssueKey(id Identity, key crypto.Signer, lifetime time.Duration) ([]*x509.Certificate, error)
}

// Authority is where a proxy's workload certificates come from and which
// roots its peers' certificates are verified against: the local *CA in
// standalone mode, a remote CA client in a cluster.
type Authority interface {
	Issuer
	// Roots returns the current trust bundle. Callers must not modify it.
	Roots() *x509.CertPool
}

// SourceConfig configures a Source.
type SourceConfig struct {
	Identity Identity
	Issuer   Issuer
	// Lifetime requested for each certificate; DefaultLifetime when zero.
	Lifetime time.Duration
	// RenewMin and RenewMax bound the fraction of a certificate's lifetime
	// after which it is renewed; the point is drawn at random between them
	// so that many workloads do not renew at once. Defaults 0.5 and 0.8.
	RenewMin, RenewMax float64
	// RetryInterval is the wait after the first failed renewal (default
	// 5 s); each further failure doubles it, up to RetryMax (default 1 min),
	// with up to 20% random jitter, and never more than half the time left
	// before expiry, so that a CA that comes back is asked again in time.
	RetryInterval, RetryMax time.Duration
	// OnRotate, when set, is called from the renewal goroutine after each
	// renewed certificate is installed (not for the first one, which
	// NewSource returns with), for metrics and logs.
	OnRotate func(*tls.Certificate)
	Logger   *slog.Logger
}

// Source holds the current certificate and key of one workload identity and
// renews them in the background before they expire. Its GetCertificate and
// GetClientCertificate methods plug into tls.Config, so a rotation only
// affects handshakes that start afterwards: open connections are never
// touched.
type Source struct {
	cfg  SourceConfig
	cur  atomic.Pointer[tls.Certificate]
	stop chan struct{}
	done chan struct{}
	once sync.Once
}

// NewSource issues the first certificate synchronously (so an error is
// returned to the caller, not logged) and starts the renewal goroutine.
// Close stops it.
func NewSource(cfg SourceConfig) (*Source, error) {
	if cfg.Issuer == nil {
		return nil, errors.New("new certificate source: nil issuer")
	}
	if err := cfg.Identity.Validate(); err != nil {
		return nil, fmt.Errorf("new certificate source: %w", err)
	}
	if cfg.RenewMin == 0 && cfg.RenewMax == 0 {
		cfg.RenewMin, cfg.RenewMax = 0.5, 0.8
	}
	if cfg.RenewMin <= 0 || cfg.RenewMax >= 1 || cfg.RenewMin > cfg.RenewMax {
		return nil, fmt.Errorf("new certificate source: renewal window [%v, %v] must satisfy 0 < min <= max < 1", cfg.RenewMin, cfg.RenewMax)
	}
	if cfg.RetryInterval <= 0 {
		cfg.RetryInterval = 5 * time.Second
	}
	if cfg.RetryMax < cfg.RetryInterval {
		cfg.RetryMax = max(time.Minute, cfg.RetryInterval)
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.Default()
	}
	cfg.Logger = cfg.Logger.With("identity", cfg.Identity.String())
	s := &Source{cfg: cfg, stop: make(chan struct{}), done: make(chan struct{})}
	next, err := s.renew()
	if err != nil {
		return nil, fmt.Errorf("new certificate source: %w", err)
	}
	go s.loop(next)
	return s, nil
}

// renew issues a certificate, installs it and returns when to renew it.
func (s *Source) renew() (time.Time, error) {
	issued := time.Now()
	tc, err := issueTLS(s.cfg.Issuer, s.cfg.Identity, s.cfg.Lifetime)
	if err != nil {
		return time.Time{}, err
	}
	got, err := FromCertificate(tc.Leaf)
	if err != nil || got != s.cfg.Identity {
		return time.Time{}, fmt.Errorf("issuer returned a certificate for %q, want %s (%v)", got, s.cfg.Identity, err)
	}
	s.cur.Store(tc)
	frac := s.cfg.RenewMin + rand.Float64()*(s.cfg.RenewMax-s.cfg.RenewMin)
	life := tc.Leaf.NotAfter.Sub(issued)
	return issued.Add(time.Duration(frac * float64(life))), nil
}

func (s *Source) loop(next time.Time) {
	defer close(s.done)
	t := time.NewTimer(time.Until(next))
	defer t.Stop()
	failures := 0
	for {
		select {
		case <-s.stop:
			return
		case <-t.C:
		}
		n, err := s.renew()
		if err != nil {
			left := time.Until(s.cur.Load().Leaf.NotAfter)
			wait := min(backoff(s.cfg.RetryInterval, s.cfg.RetryMax, failures), max(left/2, 100*time.Millisecond))
			failures++
			s.cfg.Logger.Error("renew workload certificate; the current one is served until it expires", "err", err, "expires_in", left, "retry_in", wait)
			t.Reset(wait)
			continue
		}
		failures = 0
		cur := s.cur.Load()
		s.cfg.Logger.Debug("renewed workload certificate", "serial", cur.Leaf.SerialNumber, "not_after", cur.Leaf.NotAfter, "next", n)
		if s.cfg.OnRotate != nil {
			s.cfg.OnRotate(cur)
		}
		t.Reset(time.Until(n))
	}
}

// backoff is base doubled failures times, capped at limit, less up to 20%
// random jitter so that proxies that lost the CA together do not return
// together.
func backoff(base, limit time.Duration, failures int) time.Duration {
	d := base
	for range failures {
		if d >= limit/2 {
			d = limit
			break
		}
		d *= 2
	}
	d = min(d, limit)
	return d - time.Duration(rand.Float64()*0.2*float64(d))
}

// Identity returns the identity the certificates are issued for.
func (s *Source) Identity() Identity { return s.cfg.Identity }

// Certificate returns the current certificate (never nil). Callers must not
// modify it.
func (s *Source) Certificate() *tls.Certificate { return s.cur.Load() }

// GetCertificate is a tls.Config.GetCertificate callback serving the
// current certificate.
func (s *Source) GetCertificate(*tls.ClientHelloInfo) (*tls.Certificate, error) {
	return s.cur.Load(), nil
}

// GetClientCertificate is a tls.Config.GetClientCertificate callback
// serving the current certificate.
func (s *Source) GetClientCertificate(*tls.CertificateRequestInfo) (*tls.Certificate, error) {
	return s.cur.Load(), nil
}

// Close stops renewal and waits for the renewal goroutine to exit. The last
// certificate stays available until it expires. Close is idempotent.
func (s *Source) Close() error {
	s.once.Do(func() { close(s.stop) })
	<-s.done
	return nil
}
