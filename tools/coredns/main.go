// CoreDNS with only the plugins the local cluster's DNS needs: cluster.local names of Services and
// pods (kubernetes), caching, and error logs. Nothing is forwarded: the local cluster is offline.
package main

import (
	"github.com/coredns/coredns/core/dnsserver"
	"github.com/coredns/coredns/coremain"

	_ "github.com/coredns/coredns/plugin/bind"
	_ "github.com/coredns/coredns/plugin/cache"
	_ "github.com/coredns/coredns/plugin/errors"
	_ "github.com/coredns/coredns/plugin/kubernetes"
	_ "github.com/coredns/coredns/plugin/log"
)

// The order plugins run in, as in CoreDNS's plugin.cfg.
var directives = []string{"bind", "errors", "log", "cache", "kubernetes"}

func init() { dnsserver.Directives = directives }

func main() { coremain.Run() }
