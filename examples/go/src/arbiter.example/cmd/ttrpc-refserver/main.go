// Command ttrpc-refserver is the Go reference point for benchmarks: containerd's
// own ttrpc server (github.com/containerd/ttrpc 1.1.1, ttrpc.NewServer) over TCP,
// serving grpc.health.v1.Health/Check. It answers SERVING for "" and for
// "grpc.health.v1.Health", SERVICE_UNKNOWN for any other name.
//
//	ttrpc-refserver -addr 127.0.0.1:17321
package main

import (
	"context"
	"flag"
	"fmt"
	"net"
	"os"
	"os/signal"
	"syscall"
	"time"

	"arbiter.example/arbiterpb"

	"github.com/containerd/ttrpc"
)

func main() {
	addr := flag.String("addr", "127.0.0.1:17321", "listen address host:port")
	flag.Parse()

	srv, err := ttrpc.NewServer()
	if err != nil {
		fmt.Fprintf(os.Stderr, "ttrpc-refserver: %v\n", err)
		os.Exit(1)
	}
	srv.Register(arbiterpb.HealthService, map[string]ttrpc.Method{
		arbiterpb.HealthCheck: func(ctx context.Context, unmarshal func(interface{}) error) (interface{}, error) {
			var req arbiterpb.HealthCheckRequest
			if err := unmarshal(&req); err != nil {
				return nil, err
			}
			resp := &arbiterpb.HealthCheckResponse{Status: arbiterpb.ServingStatusServiceUnknown}
			if req.Service == "" || req.Service == arbiterpb.HealthService {
				resp.Status = arbiterpb.ServingStatusServing
			}
			return resp, nil
		},
	})

	l, err := net.Listen("tcp", *addr)
	if err != nil {
		fmt.Fprintf(os.Stderr, "ttrpc-refserver: listen %s: %v\n", *addr, err)
		os.Exit(1)
	}
	fmt.Fprintf(os.Stderr, "ttrpc-refserver: serving grpc.health.v1.Health on %s\n", l.Addr())

	sigs := make(chan os.Signal, 1)
	signal.Notify(sigs, syscall.SIGINT, syscall.SIGTERM)
	go func() {
		<-sigs
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		defer cancel()
		srv.Shutdown(ctx)
		srv.Close()
		os.Exit(0)
	}()

	if err := srv.Serve(context.Background(), l); err != nil && err != ttrpc.ErrServerClosed {
		fmt.Fprintf(os.Stderr, "ttrpc-refserver: %v\n", err)
		os.Exit(1)
	}
}
