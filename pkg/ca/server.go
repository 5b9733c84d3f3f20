// Package ca is the mesh's certificate authority service: it serves
// Istio's certificate API (istio.v1.auth.IstioCertificateService,
// CreateCertificate) over gRPC and TLS, so that the node proxies (ambpf's
// or Istio's ztunnel) get each workload's certificate by CSR and no node
// holds the CA key.
//
// A request is allowed when, in this order:
//   - its CSR is at most MaxCSRBytes (checked before anything costs an
//     API call);
//   - its bearer token passes a TokenReview against the API server for
//     one of Config.Audiences (istio-ca by default) and is bound to a pod
//     (the authentication.kubernetes.io/pod-name and pod-uid extras of
//     projected tokens);
//   - the caller is within its rate limit (per caller pod);
//   - for an impersonated identity (the ImpersonatedIdentity metadata key
//     ztunnel sends), the caller's service account is a trusted node
//     account (the proxies'), its pod still exists with that UID and
//     service account, and a pod of the requested service account is
//     scheduled on the caller's node: Istio's node authorizer. Without
//     impersonation the identity is the caller's own;
//   - the CSR is one PEM CERTIFICATE REQUEST, correctly self-signed, with
//     an ECDSA P-256/P-384 or RSA 2048-4096 key and exactly the requested
//     SPIFFE ID as its only SAN.
//
// Every refusal is a gRPC status with a code (Unauthenticated,
// PermissionDenied, InvalidArgument, ResourceExhausted) and a message
// saying what was wrong; nothing is signed.
package ca

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"strings"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/peer"
	"google.golang.org/grpc/status"
	pb "istio.io/api/security/v1alpha1"
	authnv1 "k8s.io/api/authentication/v1"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/fields"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/kubernetes"

	"github.com/ambpf/ambpf/pkg/identity"
)

// Facts of Istio's CA protocol that clients rely on.
const (
	// Audience is the audience of the projected tokens Istio's clients
	// present (istiod's default).
	Audience = "istio-ca"
	// ImpersonatedIdentityKey is the IstioCertificateRequest metadata
	// field naming the identity a node proxy asks for.
	ImpersonatedIdentityKey = "ImpersonatedIdentity"
	// ClusterIDHeader is the gRPC header carrying the caller's cluster
	// (gRPC lower-cases header names; ztunnel sends "ClusterID").
	ClusterIDHeader = "clusterid"
	// DefaultClusterID is Istio's cluster ID when none is configured.
	DefaultClusterID = "Kubernetes"
)

// TokenReview extras of a token bound to a pod.
const (
	extraPodName  = "authentication.kubernetes.io/pod-name"
	extraPodUID   = "authentication.kubernetes.io/pod-uid"
	extraNodeName = "authentication.kubernetes.io/node-name"
	extraNodeUID  = "authentication.kubernetes.io/node-uid"
)

// Defaults of Config.
const (
	DefaultLifetime    = 24 * time.Hour
	DefaultMaxLifetime = 7 * 24 * time.Hour
	DefaultMaxCSRBytes = 8 << 10
	DefaultRate        = 5
	DefaultBurst       = 20
	// MaxMessageBytes is the gRPC server's receive limit: a bit over
	// the largest CSR, so that a too large CSR gets the CA's own clear
	// error rather than the transport's.
	MaxMessageBytes = 64 << 10
	apiTimeout      = 10 * time.Second
)

// Config configures a Server.
type Config struct {
	// CA signs the certificates.
	CA *identity.CA
	// Kube is the API server, for TokenReviews and pod and node reads.
	Kube kubernetes.Interface
	// TrustDomain of the identities issued; a request for another one is
	// refused.
	TrustDomain string
	// ClusterID is this cluster's ID; a request whose ClusterID header
	// names another cluster is refused (DefaultClusterID when empty).
	ClusterID string
	// Audiences a token must be valid for; [Audience] when empty.
	Audiences []string
	// TrustedNodeAccounts are the service accounts (namespace/name) that
	// may ask for the identities of the pods on their node: the node
	// proxies'. Istio's CA_TRUSTED_NODE_ACCOUNTS.
	TrustedNodeAccounts []types.NamespacedName
	// DefaultLifetime is used when a request asks for none; MaxLifetime
	// caps what a request asks for.
	DefaultLifetime, MaxLifetime time.Duration
	// MaxCSRBytes bounds the PEM CSR.
	MaxCSRBytes int
	// Rate and Burst bound the requests per second of one caller pod (and,
	// before authentication, of one peer address, at four times that).
	Rate  float64
	Burst int
	// Registerer, when set, gets the server's metrics.
	Registerer prometheus.Registerer
	Logger     *slog.Logger
}

// Server implements pb.IstioCertificateServiceServer.
type Server struct {
	pb.UnimplementedIstioCertificateServiceServer
	cfg      Config
	trusted  map[types.NamespacedName]bool
	callers  *limiters // per caller pod UID
	peers    *limiters // per peer IP, before authentication
	requests *prometheus.CounterVec
}

// New checks cfg and returns a Server.
func New(cfg Config) (*Server, error) {
	if cfg.CA == nil || cfg.Kube == nil {
		return nil, errors.New("new CA server: CA and Kube are required")
	}
	if cfg.TrustDomain == "" {
		return nil, errors.New("new CA server: empty trust domain")
	}
	if cfg.ClusterID == "" {
		cfg.ClusterID = DefaultClusterID
	}
	if len(cfg.Audiences) == 0 {
		cfg.Audiences = []string{Audience}
	}
	if cfg.DefaultLifetime <= 0 {
		cfg.DefaultLifetime = DefaultLifetime
	}
	if cfg.MaxLifetime <= 0 {
		cfg.MaxLifetime = DefaultMaxLifetime
	}
	cfg.DefaultLifetime = min(cfg.DefaultLifetime, cfg.MaxLifetime)
	if cfg.MaxCSRBytes <= 0 {
		cfg.MaxCSRBytes = DefaultMaxCSRBytes
	}
	if cfg.Rate <= 0 {
		cfg.Rate = DefaultRate
	}
	if cfg.Burst <= 0 {
		cfg.Burst = DefaultBurst
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.Default()
	}
	s := &Server{
		cfg:     cfg,
		trusted: map[types.NamespacedName]bool{},
		callers: newLimiters(cfg.Rate, cfg.Burst),
		peers:   newLimiters(4*cfg.Rate, 4*cfg.Burst),
		requests: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "ambpf_ca_requests_total",
			Help: "CreateCertificate requests by result: issued, or the gRPC code of the refusal.",
		}, []string{"result"}),
	}
	for _, a := range cfg.TrustedNodeAccounts {
		s.trusted[a] = true
	}
	if cfg.Registerer != nil {
		if err := cfg.Registerer.Register(s.requests); err != nil {
			return nil, fmt.Errorf("register CA metrics: %w", err)
		}
	}
	return s, nil
}

// Register registers the service on a gRPC server.
func (s *Server) Register(g *grpc.Server) { pb.RegisterIstioCertificateServiceServer(g, s) }

// caller is an authenticated requester: a pod's service account.
type caller struct {
	ns, sa           string
	podName, podUID  string
	nodeName, nodeID string // from the token, when the API server puts them there
}

func (c caller) String() string { return c.ns + "/" + c.sa + " (pod " + c.ns + "/" + c.podName + ")" }

// CreateCertificate implements the Istio certificate service.
func (s *Server) CreateCertificate(ctx context.Context, req *pb.IstioCertificateRequest) (*pb.IstioCertificateResponse, error) {
	resp, who, id, err := s.create(ctx, req)
	log := s.cfg.Logger.With("caller", who, "identity", id)
	if err != nil {
		st, _ := status.FromError(err)
		s.requests.WithLabelValues(st.Code().String()).Inc()
		log.Warn("certificate refused", "code", st.Code().String(), "reason", st.Message(), "peer", peerAddr(ctx))
		return nil, err
	}
	s.requests.WithLabelValues("issued").Inc()
	log.Info("certificate issued")
	return resp, nil
}

func (s *Server) create(ctx context.Context, req *pb.IstioCertificateRequest) (*pb.IstioCertificateResponse, string, string, error) {
	if !s.peers.allow(peerHost(ctx)) {
		return nil, "", "", status.Errorf(codes.ResourceExhausted, "too many requests from %s: limit %.0f/s", peerHost(ctx), 4*s.cfg.Rate)
	}
	if n := len(req.GetCsr()); n > s.cfg.MaxCSRBytes {
		return nil, "", "", status.Errorf(codes.InvalidArgument, "CSR is %d bytes, the limit is %d", n, s.cfg.MaxCSRBytes)
	}
	md, _ := metadata.FromIncomingContext(ctx)
	if cl := first(md, ClusterIDHeader); cl != "" && cl != s.cfg.ClusterID {
		return nil, "", "", status.Errorf(codes.PermissionDenied, "request for cluster %q, this CA serves cluster %q", cl, s.cfg.ClusterID)
	}
	c, err := s.authenticate(ctx, first(md, "authorization"))
	if err != nil {
		return nil, "", "", err
	}
	who := c.String()
	if !s.callers.allow(c.podUID) {
		return nil, who, "", status.Errorf(codes.ResourceExhausted, "too many requests from %s: limit %g/s, burst %d", who, s.cfg.Rate, s.cfg.Burst)
	}
	id, err := s.authorize(ctx, c, req.GetMetadata().GetFields()[ImpersonatedIdentityKey].GetStringValue())
	if err != nil {
		return nil, who, "", err
	}
	pub, err := checkCSR([]byte(req.GetCsr()), id)
	if err != nil {
		return nil, who, id.String(), status.Errorf(codes.InvalidArgument, "CSR: %v", err)
	}
	life := s.cfg.DefaultLifetime
	switch v := req.GetValidityDuration(); {
	case v < 0:
		return nil, who, id.String(), status.Errorf(codes.InvalidArgument, "negative validity %d s", v)
	case v > 0:
		life = min(time.Duration(v)*time.Second, s.cfg.MaxLifetime)
	}
	chain, err := s.cfg.CA.Issue(id, pub, life)
	if err != nil {
		return nil, who, id.String(), status.Errorf(codes.Internal, "sign: %v", err)
	}
	// Istio's layout: the leaf, its intermediates, the root last.
	resp := &pb.IstioCertificateResponse{}
	for _, c := range chain {
		resp.CertChain = append(resp.CertChain, pemCert(c.Raw))
	}
	resp.CertChain = append(resp.CertChain, string(s.cfg.CA.RootsPEM()))
	return resp, who, id.String(), nil
}

// authenticate reviews the bearer token with the API server.
func (s *Server) authenticate(ctx context.Context, authz string) (caller, error) {
	token, ok := strings.CutPrefix(authz, "Bearer ")
	if !ok || token == "" {
		return caller{}, status.Error(codes.Unauthenticated, "no bearer token in the authorization header")
	}
	ctx, cancel := context.WithTimeout(ctx, apiTimeout)
	defer cancel()
	tr, err := s.cfg.Kube.AuthenticationV1().TokenReviews().Create(ctx, &authnv1.TokenReview{
		Spec: authnv1.TokenReviewSpec{Token: token, Audiences: s.cfg.Audiences},
	}, metav1.CreateOptions{})
	if err != nil {
		return caller{}, status.Errorf(codes.Unavailable, "token review: %v", err)
	}
	st := tr.Status
	if !st.Authenticated {
		return caller{}, status.Errorf(codes.Unauthenticated, "token rejected by the API server for audiences %v: %s", s.cfg.Audiences, st.Error)
	}
	if !overlaps(st.Audiences, s.cfg.Audiences) {
		return caller{}, status.Errorf(codes.Unauthenticated, "token audiences %v are none of %v", st.Audiences, s.cfg.Audiences)
	}
	parts := strings.Split(st.User.Username, ":")
	if len(parts) != 4 || parts[0] != "system" || parts[1] != "serviceaccount" {
		return caller{}, status.Errorf(codes.Unauthenticated, "%q is not a service account", st.User.Username)
	}
	c := caller{
		ns: parts[2], sa: parts[3],
		podName:  extra(st.User.Extra, extraPodName),
		podUID:   extra(st.User.Extra, extraPodUID),
		nodeName: extra(st.User.Extra, extraNodeName),
		nodeID:   extra(st.User.Extra, extraNodeUID),
	}
	if c.podName == "" || c.podUID == "" {
		return caller{}, status.Errorf(codes.Unauthenticated, "token of %s/%s is not bound to a pod (use a projected service account token)", c.ns, c.sa)
	}
	return c, nil
}

// authorize returns the identity c may have: its own, or the impersonated
// one when c is a node proxy and a pod of that identity runs on its node.
func (s *Server) authorize(ctx context.Context, c caller, impersonated string) (identity.Identity, error) {
	if impersonated == "" {
		id, err := identity.New(s.cfg.TrustDomain, c.ns, c.sa)
		if err != nil {
			return identity.Identity{}, status.Errorf(codes.InvalidArgument, "caller identity: %v", err)
		}
		return id, nil
	}
	id, err := identity.Parse(impersonated)
	if err != nil {
		return identity.Identity{}, status.Errorf(codes.InvalidArgument, "impersonated identity: %v", err)
	}
	if id.TrustDomain != s.cfg.TrustDomain {
		return id, status.Errorf(codes.PermissionDenied, "identity %s is outside trust domain %q", id, s.cfg.TrustDomain)
	}
	if !s.trusted[types.NamespacedName{Namespace: c.ns, Name: c.sa}] {
		return id, status.Errorf(codes.PermissionDenied, "%s/%s is not a trusted node account: it may not ask for other identities", c.ns, c.sa)
	}
	ctx, cancel := context.WithTimeout(ctx, apiTimeout)
	defer cancel()
	pods := s.cfg.Kube.CoreV1().Pods
	self, err := pods(c.ns).Get(ctx, c.podName, metav1.GetOptions{})
	switch {
	case apierrors.IsNotFound(err):
		return id, status.Errorf(codes.PermissionDenied, "caller pod %s/%s no longer exists", c.ns, c.podName)
	case err != nil:
		return id, status.Errorf(codes.Unavailable, "read caller pod: %v", err)
	case string(self.UID) != c.podUID:
		return id, status.Errorf(codes.PermissionDenied, "caller pod %s/%s was replaced (uid %s, token for %s)", c.ns, c.podName, self.UID, c.podUID)
	case self.Spec.ServiceAccountName != c.sa:
		return id, status.Errorf(codes.PermissionDenied, "caller pod %s/%s runs as %q, not %q", c.ns, c.podName, self.Spec.ServiceAccountName, c.sa)
	case self.Spec.NodeName == "":
		return id, status.Errorf(codes.PermissionDenied, "caller pod %s/%s is not scheduled on a node", c.ns, c.podName)
	case c.nodeName != "" && c.nodeName != self.Spec.NodeName:
		return id, status.Errorf(codes.PermissionDenied, "token names node %q, caller pod runs on %q", c.nodeName, self.Spec.NodeName)
	}
	node := self.Spec.NodeName
	if c.nodeID != "" {
		n, err := s.cfg.Kube.CoreV1().Nodes().Get(ctx, node, metav1.GetOptions{})
		switch {
		case apierrors.IsNotFound(err):
			return id, status.Errorf(codes.PermissionDenied, "caller's node %q no longer exists", node)
		case err != nil:
			return id, status.Errorf(codes.Unavailable, "read node: %v", err)
		case string(n.UID) != c.nodeID:
			return id, status.Errorf(codes.PermissionDenied, "caller's node %q was replaced since its token was issued", node)
		}
	}
	list, err := pods(id.Namespace).List(ctx, metav1.ListOptions{
		FieldSelector: fields.OneTermEqualSelector("spec.nodeName", node).String(),
	})
	if err != nil {
		return id, status.Errorf(codes.Unavailable, "list pods on node %s: %v", node, err)
	}
	for _, p := range list.Items {
		if p.Spec.ServiceAccountName == id.ServiceAccount && p.Status.Phase != corev1.PodFailed && p.Status.Phase != corev1.PodSucceeded && p.DeletionTimestamp == nil {
			return id, nil
		}
	}
	return id, status.Errorf(codes.PermissionDenied, "no running pod with service account %s/%s on node %q, the caller's node", id.Namespace, id.ServiceAccount, node)
}

func first(md metadata.MD, key string) string {
	if v := md.Get(key); len(v) > 0 {
		return v[0]
	}
	return ""
}

func extra(m map[string]authnv1.ExtraValue, key string) string {
	if v := m[key]; len(v) == 1 {
		return v[0]
	}
	return ""
}

func overlaps(a, b []string) bool {
	for _, x := range a {
		for _, y := range b {
			if x == y {
				return true
			}
		}
	}
	return false
}

func peerAddr(ctx context.Context) string {
	if p, ok := peer.FromContext(ctx); ok && p.Addr != nil {
		return p.Addr.String()
	}
	return ""
}

func peerHost(ctx context.Context) string {
	a := peerAddr(ctx)
	if h, _, err := net.SplitHostPort(a); err == nil {
		return h
	}
	return a
}
