package dnsproxy

import (
	"net/netip"
	"strings"

	"github.com/ambpf/ambpf/pkg/discovery"
)

// DefaultClusterDomain is Kubernetes' default cluster domain.
const DefaultClusterDomain = "cluster.local"

// Catalog is what the resolver reads of the mesh.
type Catalog interface {
	// Services returns every known service; the slice and what it points
	// to are not modified.
	Services() []*discovery.Service
}

// Names resolves service names for one client pod the way ztunnel's DNS
// proxy does (src/dns/server.rs, get_aliases and to_kube_fqdns): the
// name asked, the Kubernetes FQDNs it can be short for from the client's
// namespace, and the same after stripping one of the pod's search
// domains (<ns>.svc.<domain>, svc.<domain>, <domain>, which is what
// ztunnel assumes in a pod) are tried in that order against the
// services' hostnames <name>.<namespace>.svc.<domain>.
type Names struct {
	Catalog Catalog
	// Namespace is the client pod's namespace.
	Namespace string
	// ClusterDomain is the cluster's DNS domain; "" is
	// DefaultClusterDomain.
	ClusterDomain string
}

// Match is a resolved mesh name.
type Match struct {
	// Service is the service the name resolved to.
	Service *discovery.Service
	// Canonical is set when the name was found after stripping a search
	// domain: the stripped name, which the answer gives as a CNAME target
	// of the asked name and as the owner of the address records.
	Canonical string
}

// Resolve finds the service name (lower case, no trailing dot) stands
// for, and false when it is not a mesh name (the query is forwarded).
func (n *Names) Resolve(name string) (Match, bool) {
	aliases := n.aliases(name)
	suffix := ".svc." + n.domain()
	// One pass over the services, keeping the one of the earliest alias
	// (the aliases are few; the services may be many).
	best := len(aliases)
	var found *discovery.Service
	for _, svc := range n.Catalog.Services() {
		host := svc.Name + "." + svc.Namespace + suffix
		for i := 0; i < best; i++ {
			if aliases[i].name == host {
				best, found = i, svc
				break
			}
		}
	}
	if found == nil {
		return Match{}, false
	}
	return Match{Service: found, Canonical: aliases[best].stripped}, true
}

func (n *Names) domain() string {
	if n.ClusterDomain == "" {
		return DefaultClusterDomain
	}
	return strings.ToLower(strings.Trim(n.ClusterDomain, "."))
}

// SearchDomains is the search list ztunnel assumes for a pod in
// namespace: <ns>.svc.<domain>, svc.<domain>, <domain>.
func (n *Names) SearchDomains() []string {
	d := n.domain()
	return []string{n.Namespace + ".svc." + d, "svc." + d, d}
}

type alias struct{ name, stripped string }

// aliases lists the names to look up for name, without duplicates.
func (n *Names) aliases(name string) []alias {
	var out []alias
	seen := map[string]bool{}
	add := func(a alias) {
		if !seen[a.name] {
			seen[a.name] = true
			out = append(out, a)
		}
	}
	add(alias{name: name})
	for _, f := range n.kubeFQDNs(name) {
		add(alias{name: f})
	}
	for _, sd := range n.SearchDomains() {
		stripped, ok := strings.CutSuffix(name, "."+sd)
		if !ok || stripped == "" {
			continue
		}
		add(alias{name: stripped, stripped: stripped})
		for _, f := range n.kubeFQDNs(stripped) {
			add(alias{name: f, stripped: stripped})
		}
	}
	return out
}

// kubeFQDNs expands a short name into the Kubernetes FQDNs it can stand
// for: <svc> in the client's namespace, <svc>.<ns>, <svc>.<ns>.svc, and
// the pod forms <host>.<subdomain>[.<ns>[.svc]].
func (n *Names) kubeFQDNs(name string) []string {
	d := n.domain()
	nsDomain := n.Namespace + ".svc." + d
	labels := strings.Split(name, ".")
	switch len(labels) {
	case 1:
		return []string{name + "." + nsDomain}
	case 2:
		return []string{name + ".svc." + d, name + "." + nsDomain}
	case 3:
		var out []string
		if labels[2] == "svc" {
			out = append(out, name+"."+d)
		}
		return append(out, name+".svc."+d)
	case 4:
		if labels[3] == "svc" {
			return []string{name + "." + d}
		}
	}
	return nil
}

// Addresses are the answer addresses of svc: its VIPs, or for a headless
// service the IPs of its ready endpoints.
func Addresses(svc *discovery.Service) []netip.Addr {
	if len(svc.VIPs) > 0 || !svc.Headless {
		return svc.VIPs
	}
	var out []netip.Addr
	for _, e := range svc.Endpoints {
		if e.IsReady() {
			out = append(out, e.IP)
		}
	}
	return out
}
