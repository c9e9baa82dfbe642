package nodeagent

import (
	"context"
	"fmt"
	"net"
	"os"
	"sort"
	"testing"
	"time"
)

// BenchmarkFirstConnect measures a container's first TCP connect to the gateway right after its
// sandbox is ready (what a worker does first: connect to the broker on the node's address), with
// and without the wait for the bridge port (waitForwarding), on a bridge of its own:
//
//	cd localcluster && go test ./nodeagent -run '^$' -bench FirstConnect -benchtime 100x
//
// It reports the share of connects that took over 500 ms (a lost first ARP request is resent
// after 1 s) and the median connect time.
func BenchmarkFirstConnect(b *testing.B) {
	if os.Geteuid() != 0 {
		b.Fatal("this benchmark creates network namespaces and needs root")
	}
	for _, wait := range []bool{false, true} {
		name := "without-wait"
		if wait {
			name = "with-wait"
		}
		b.Run(name, func(b *testing.B) { benchFirstConnect(b, wait) })
	}
}

func benchFirstConnect(b *testing.B, wait bool) {
	ctx := context.Background()
	bridge := fmt.Sprintf("lcf%d", os.Getpid()%100000)
	n, err := newNetwork(bridge, "10.251.13.0/24")
	if err != nil {
		b.Fatal(err)
	}
	n.noForwardingWait = !wait
	b.Cleanup(func() { _ = ipCmd(ctx, "link", "del", bridge) })
	if err := n.ensureBridge(ctx); err != nil {
		b.Fatal(err)
	}
	for _, step := range [][]string{{"addr", "add", "10.251.13.1/24", "dev", bridge}, {"link", "set", bridge, "up"}} {
		if err := ipCmd(ctx, step...); err != nil {
			b.Fatal(err)
		}
	}
	ln, err := net.Listen("tcp", "10.251.13.1:0")
	if err != nil {
		b.Fatal(err)
	}
	defer ln.Close()
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			_ = c.Close()
		}
	}()
	var took []time.Duration
	var pods []string
	defer func() {
		for _, uid := range pods {
			n.release(ctx, uid)
		}
	}()
	for i := 0; i < b.N; i++ {
		uid := fmt.Sprintf("first-connect-%d-%t-%d", os.Getpid(), wait, i)
		if _, err := n.sandbox(ctx, uid); err != nil {
			b.Fatal(err)
		}
		pods = append(pods, uid)
		start := time.Now()
		err := inNetns(nsPath(uid), func() error {
			c, err := net.DialTimeout("tcp", ln.Addr().String(), 5*time.Second)
			if err == nil {
				_ = c.Close()
			}
			return err
		})
		if err != nil {
			b.Fatal(err)
		}
		took = append(took, time.Since(start))
		if len(pods) == 200 { // the /24 holds 252 pods
			for _, uid := range pods {
				n.release(ctx, uid)
			}
			pods = nil
		}
	}
	slow := 0
	for _, d := range took {
		if d > 500*time.Millisecond {
			slow++
		}
	}
	sort.Slice(took, func(i, j int) bool { return took[i] < took[j] })
	b.ReportMetric(float64(slow)/float64(len(took)), "slow-share")
	b.ReportMetric(float64(took[len(took)/2].Microseconds())/1000, "median-ms")
}
