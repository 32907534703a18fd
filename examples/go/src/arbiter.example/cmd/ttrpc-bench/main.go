// Command ttrpc-bench is a closed-loop load client for grpc.health.v1.Health/Check
// built on containerd's ttrpc.Client (github.com/containerd/ttrpc 1.1.1).
//
// It opens -conns TCP connections (one ttrpc.Client each) and keeps
// -concurrency calls outstanding on each: every worker issues its next call as
// soon as the previous one returns. After -warmup it measures for -duration
// and prints one line:
//
//	conns=16 calls=123456 throughput=24691/s p50=512us p99=1830us errors=0
//
// Only calls that both start and finish inside the measurement window count;
// latencies are recorded per call and sorted for the percentiles. -json prints
// a JSON object instead (with a few more fields).
package main

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"math"
	"math/rand"
	"net"
	"os"
	"sort"
	"sync"
	"sync/atomic"
	"time"

	"arbiter.example/arbiterpb"

	"github.com/containerd/ttrpc"
)

type result struct {
	Addr        string  `json:"addr"`
	Conns       int     `json:"conns"`
	Concurrency int     `json:"concurrency"`
	DurationS   float64 `json:"duration_s"`
	Calls       int     `json:"calls"`
	Errors      int64   `json:"errors"`
	Throughput  float64 `json:"throughput_per_s"`
	MeanUs      float64 `json:"mean_us"`
	P50Us       float64 `json:"p50_us"`
	P90Us       float64 `json:"p90_us"`
	P99Us       float64 `json:"p99_us"`
	P999Us      float64 `json:"p999_us"`
	MaxUs       float64 `json:"max_us"`
	FirstError  string  `json:"first_error,omitempty"`
}

func main() {
	var (
		addr        = flag.String("addr", "127.0.0.1:17311", "server address host:port")
		conns       = flag.Int("conns", 1, "number of connections, each its own ttrpc.Client")
		concurrency = flag.Int("concurrency", 8, "outstanding calls per connection")
		duration    = flag.Duration("duration", 5*time.Second, "measurement duration")
		warmup      = flag.Duration("warmup", time.Second, "warm-up before measuring")
		service     = flag.String("service", "", "HealthCheckRequest.service to send")
		asJSON      = flag.Bool("json", false, "print a JSON object instead of the one-line summary")
		method      = flag.String("method", "check", "check (Health/Check), resolve or link (arbiter.identity.v1.Identity)")
		persons     = flag.Int("persons", 500000, "resolve/link: persons seeded as user<i>@example.com (arbiter-bench identity --seed-only)")
	)
	flag.Parse()
	if *conns < 1 || *concurrency < 1 || *duration <= 0 {
		fmt.Fprintln(os.Stderr, "ttrpc-bench: -conns and -concurrency must be >= 1, -duration > 0")
		os.Exit(2)
	}

	clients := make([]*ttrpc.Client, *conns)
	for i := range clients {
		c, err := net.DialTimeout("tcp", *addr, 3*time.Second)
		if err != nil {
			fmt.Fprintf(os.Stderr, "ttrpc-bench: connection %d: %v\n", i, err)
			os.Exit(1)
		}
		clients[i] = ttrpc.NewClient(c)
	}

	// Sanity call before load.
	{
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		var resp arbiterpb.HealthCheckResponse
		err := clients[0].Call(ctx, arbiterpb.HealthService, arbiterpb.HealthCheck, &arbiterpb.HealthCheckRequest{Service: *service}, &resp)
		cancel()
		if err != nil {
			fmt.Fprintf(os.Stderr, "ttrpc-bench: first Health/Check failed: %v\n", err)
			os.Exit(1)
		}
	}

	var (
		start   = time.Now()
		mStart  = start.Add(*warmup)
		mEnd    = mStart.Add(*duration)
		stop    int32
		errs    int64
		errOnce sync.Once
		first   string
		wg      sync.WaitGroup
		mu      sync.Mutex
		all     []time.Duration
	)
	workers := *conns * *concurrency
	for w := 0; w < workers; w++ {
		wg.Add(1)
		go func(c *ttrpc.Client) {
			defer wg.Done()
			req := &arbiterpb.HealthCheckRequest{Service: *service}
			local := make([]time.Duration, 0, 4096)
			rng := rand.New(rand.NewSource(time.Now().UnixNano()))
			n := 0
			for atomic.LoadInt32(&stop) == 0 {
				var resp arbiterpb.HealthCheckResponse
				var err error
				t0 := time.Now()
				switch *method {
				case "resolve":
					var r arbiterpb.ResolveResponse
					email := fmt.Sprintf("user%d@example.com", rng.Intn(*persons))
					err = c.Call(context.Background(), arbiterpb.IdentityService, arbiterpb.IdentityResolve,
						&arbiterpb.ResolveRequest{Identifiers: []*arbiterpb.Identifier{{Type: "email", Value: email}}}, &r)
					resp.Status = arbiterpb.ServingStatusServing
					if err == nil && r.PersonId == "" {
						resp.Status = arbiterpb.ServingStatusUnknown
					}
				case "link":
					var r arbiterpb.LinkResponse
					p := rng.Intn(*persons)
					n++
					err = c.Call(context.Background(), arbiterpb.IdentityService, arbiterpb.IdentityLink,
						&arbiterpb.LinkRequest{Source: "bench", Identifiers: []*arbiterpb.Identifier{
							{Type: "email", Value: fmt.Sprintf("user%d@example.com", p)},
							{Type: "device_id", Value: fmt.Sprintf("device-%d-%d", p, n/2)}}}, &r)
					resp.Status = arbiterpb.ServingStatusServing
				default:
					err = c.Call(context.Background(), arbiterpb.HealthService, arbiterpb.HealthCheck, req, &resp)
				}
				t1 := time.Now()
				if t0.Before(mStart) || t1.After(mEnd) {
					continue
				}
				if err != nil || resp.Status != arbiterpb.ServingStatusServing {
					atomic.AddInt64(&errs, 1)
					errOnce.Do(func() {
						if err != nil {
							first = err.Error()
						} else {
							first = "status " + resp.Status.String()
						}
					})
					continue
				}
				local = append(local, t1.Sub(t0))
			}
			mu.Lock()
			all = append(all, local...)
			mu.Unlock()
		}(clients[w%*conns])
	}

	time.Sleep(time.Until(mEnd))
	atomic.StoreInt32(&stop, 1)
	// Let in-flight calls finish; close the clients if they do not.
	done := make(chan struct{})
	go func() { wg.Wait(); close(done) }()
	select {
	case <-done:
	case <-time.After(5 * time.Second):
		for _, c := range clients {
			c.Close()
		}
		<-done
	}
	for _, c := range clients {
		c.Close()
	}

	sort.Slice(all, func(i, j int) bool { return all[i] < all[j] })
	r := result{
		Addr:        *addr,
		Conns:       *conns,
		Concurrency: *concurrency,
		DurationS:   duration.Seconds(),
		Calls:       len(all),
		Errors:      atomic.LoadInt64(&errs),
		Throughput:  float64(len(all)) / duration.Seconds(),
		P50Us:       pct(all, 0.50),
		P90Us:       pct(all, 0.90),
		P99Us:       pct(all, 0.99),
		P999Us:      pct(all, 0.999),
		FirstError:  first,
	}
	if len(all) > 0 {
		var sum time.Duration
		for _, d := range all {
			sum += d
		}
		r.MeanUs = us(sum / time.Duration(len(all)))
		r.MaxUs = us(all[len(all)-1])
	}

	if *asJSON {
		enc := json.NewEncoder(os.Stdout)
		enc.Encode(r)
	} else {
		fmt.Printf("conns=%d calls=%d throughput=%.0f/s p50=%.0fus p99=%.0fus errors=%d\n",
			r.Conns, r.Calls, r.Throughput, r.P50Us, r.P99Us, r.Errors)
	}
	if first != "" {
		fmt.Fprintf(os.Stderr, "ttrpc-bench: first error: %s\n", first)
	}
	if r.Calls == 0 {
		os.Exit(1)
	}
}

func us(d time.Duration) float64 { return float64(d) / float64(time.Microsecond) }

// pct is the nearest-rank percentile of sorted latencies, in microseconds.
func pct(sorted []time.Duration, p float64) float64 {
	if len(sorted) == 0 {
		return 0
	}
	i := int(math.Ceil(p*float64(len(sorted)))) - 1
	if i < 0 {
		i = 0
	}
	if i >= len(sorted) {
		i = len(sorted) - 1
	}
	return us(sorted[i])
}
