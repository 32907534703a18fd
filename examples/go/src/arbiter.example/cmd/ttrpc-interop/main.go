// Command ttrpc-interop checks an Arbiter conformance server (arbiter-echo)
// with containerd's own ttrpc client (github.com/containerd/ttrpc 1.1.1), plus
// a few raw-socket checks for frames that client never sends.
//
// It prints one line per check, "PASS <name>: <detail>" or
// "FAIL <name>: <detail>", and exits 1 when any check fails (2 on usage or
// connection errors).
//
//	ttrpc-interop -addr 127.0.0.1:17311 [-token T] [-expect-auth] [-run SUBSTR]
//
// The expected behaviour is /work/notes/server-behaviour.md.
//
// About deadlines: the Go client derives timeout_nano from the context
// deadline and, independently, gives up locally with context.DeadlineExceeded
// when the context expires, so a call with a 300ms context against a 2s delay
// races the server's DEADLINE_EXCEEDED against the local timer. The check
// "deadline-exceeded-client" therefore accepts either (and says which one it
// saw). The server's own behaviour is tested by "deadline-exceeded-server" and
// "deadline-negative": a client interceptor overrides timeout_nano on the wire
// while the local context carries only a generous safety deadline, so the
// only possible source of DEADLINE_EXCEEDED is the server's status.
package main

import (
	"bytes"
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"math/rand"
	"net"
	"os"
	"regexp"
	"sort"
	"strings"
	"sync"
	"time"

	"arbiter.example/arbiterpb"
	"arbiter.example/rawttrpc"

	"github.com/containerd/ttrpc"
	"github.com/gogo/protobuf/proto"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

const (
	maxMessage   = 4194304
	oversizeBlob = 5 << 20 // 5 MiB
	rawTimeout   = 5 * time.Second
)

var (
	addr       = flag.String("addr", "127.0.0.1:17311", "server address host:port")
	token      = flag.String("token", "", "bearer token sent as metadata `authorization: Bearer <token>`")
	expectAuth = flag.Bool("expect-auth", false, "the server requires a token: also check UNAUTHENTICATED without/with a wrong token and that Health works without one")
	runFilter  = flag.String("run", "", "only run checks whose name contains this substring")
	dialWait   = flag.Duration("dial-timeout", 5*time.Second, "how long to keep trying to connect")
)

// timeoutOverrideKey marks a context whose wire timeout_nano is replaced by
// the interceptor (see package comment).
type timeoutOverrideKey struct{}

func withWireTimeout(ctx context.Context, nanos int64) context.Context {
	return context.WithValue(ctx, timeoutOverrideKey{}, nanos)
}

// interceptor adds the bearer token (when the client has one) and applies a
// timeout_nano override.
func interceptor(tok string) ttrpc.UnaryClientInterceptor {
	return func(ctx context.Context, req *ttrpc.Request, resp *ttrpc.Response, _ *ttrpc.UnaryClientInfo, invoker ttrpc.Invoker) error {
		if tok != "" {
			req.Metadata = append(req.Metadata, &ttrpc.KeyValue{Key: "authorization", Value: "Bearer " + tok})
		}
		if v, ok := ctx.Value(timeoutOverrideKey{}).(int64); ok {
			req.TimeoutNano = v
		}
		return invoker(ctx, req, resp)
	}
}

func dial(tok string) (*ttrpc.Client, error) {
	conn, err := net.DialTimeout("tcp", *addr, 3*time.Second)
	if err != nil {
		return nil, err
	}
	return ttrpc.NewClient(conn, ttrpc.WithUnaryClientInterceptor(interceptor(tok))), nil
}

// rawDial opens a raw connection (no ttrpc client).
func rawDial() (*rawttrpc.Conn, error) { return rawttrpc.Dial(*addr, 3*time.Second) }

// authMD is the metadata a raw request needs to pass authentication.
func authMD() []string {
	if *token == "" {
		return nil
	}
	return []string{"authorization", "Bearer " + *token}
}

// ---------------------------------------------------------------------------
// check bookkeeping

type checker struct {
	passed, failed int
}

func failf(format string, a ...interface{}) error { return errors.New(fmt.Sprintf(format, a...)) }

func (c *checker) run(name string, f func() (string, error)) {
	if *runFilter != "" && !strings.Contains(name, *runFilter) {
		return
	}
	start := time.Now()
	detail, err := func() (d string, err error) {
		defer func() {
			if r := recover(); r != nil {
				err = fmt.Errorf("panic: %v", r)
			}
		}()
		return f()
	}()
	took := time.Since(start).Round(time.Millisecond)
	if err != nil {
		c.failed++
		fmt.Printf("FAIL %s: %v (%v)\n", name, err, took)
		return
	}
	c.passed++
	fmt.Printf("PASS %s: %s (%v)\n", name, detail, took)
}

// codeOf maps an error returned by ttrpc.Client.Call to a gRPC code; ok is
// false for errors that are not a server status (local errors).
func codeOf(err error) (codes.Code, string, bool) {
	if err == nil {
		return codes.OK, "", true
	}
	if st, ok := status.FromError(err); ok {
		return st.Code(), st.Message(), true
	}
	return codes.Unknown, err.Error(), false
}

// expectStatus checks err is a server status with the given code (and
// message, unless wantMsg is nil).
func expectStatus(err error, want codes.Code, wantMsg *string) (string, error) {
	code, msg, ok := codeOf(err)
	if !ok {
		return "", failf("want status %v, got non-status error %v", want, err)
	}
	if code != want {
		return "", failf("want status %v, got %v %q", want, code, msg)
	}
	if wantMsg != nil && msg != *wantMsg {
		return "", failf("status %v as expected, but message %q, want %q", code, msg, *wantMsg)
	}
	return fmt.Sprintf("%v %q", code, msg), nil
}

func strp(s string) *string { return &s }

func health(ctx context.Context, c *ttrpc.Client, service string) (*arbiterpb.HealthCheckResponse, error) {
	var resp arbiterpb.HealthCheckResponse
	err := c.Call(ctx, arbiterpb.HealthService, arbiterpb.HealthCheck, &arbiterpb.HealthCheckRequest{Service: service}, &resp)
	return &resp, err
}

func echo(ctx context.Context, c *ttrpc.Client, req *arbiterpb.EchoRequest) (*arbiterpb.EchoResponse, error) {
	var resp arbiterpb.EchoResponse
	err := c.Call(ctx, arbiterpb.EchoService, arbiterpb.EchoMethod, req, &resp)
	return &resp, err
}

func bg(d time.Duration) (context.Context, context.CancelFunc) {
	return context.WithTimeout(context.Background(), d)
}

// safety is a local context deadline far beyond anything a check waits for;
// used with withWireTimeout so the wire timeout_nano is what the check says.
func safety() (context.Context, context.CancelFunc) {
	return context.WithTimeout(context.Background(), 20*time.Second)
}

func main() {
	flag.Parse()
	if *expectAuth && *token == "" {
		fmt.Fprintln(os.Stderr, "ttrpc-interop: -expect-auth needs -token (the valid token)")
		os.Exit(2)
	}

	// Wait for the server to accept connections.
	deadline := time.Now().Add(*dialWait)
	for {
		conn, err := net.DialTimeout("tcp", *addr, time.Second)
		if err == nil {
			conn.Close()
			break
		}
		if time.Now().After(deadline) {
			fmt.Fprintf(os.Stderr, "ttrpc-interop: cannot connect to %s: %v\n", *addr, err)
			os.Exit(2)
		}
		time.Sleep(100 * time.Millisecond)
	}

	client, err := dial(*token)
	if err != nil {
		fmt.Fprintf(os.Stderr, "ttrpc-interop: %v\n", err)
		os.Exit(2)
	}
	defer client.Close()

	c := &checker{}
	fmt.Printf("# ttrpc-interop against %s (token=%v, expect-auth=%v)\n", *addr, *token != "", *expectAuth)

	// --- Health -----------------------------------------------------------
	c.run("health-overall", func() (string, error) {
		ctx, cancel := bg(5 * time.Second)
		defer cancel()
		r, err := health(ctx, client, "")
		if err != nil {
			return "", failf("Check(\"\"): %v", err)
		}
		if r.Status != arbiterpb.ServingStatusServing {
			return "", failf("Check(\"\") = %v, want SERVING", r.Status)
		}
		return "Check(\"\") = SERVING", nil
	})
	c.run("health-echo-service", func() (string, error) {
		ctx, cancel := bg(5 * time.Second)
		defer cancel()
		r, err := health(ctx, client, arbiterpb.EchoService)
		if err != nil {
			return "", failf("Check(%q): %v", arbiterpb.EchoService, err)
		}
		if r.Status != arbiterpb.ServingStatusServing {
			return "", failf("Check(%q) = %v, want SERVING", arbiterpb.EchoService, r.Status)
		}
		return fmt.Sprintf("Check(%q) = SERVING", arbiterpb.EchoService), nil
	})
	c.run("health-unknown-service", func() (string, error) {
		ctx, cancel := bg(5 * time.Second)
		defer cancel()
		r, err := health(ctx, client, "no.such.Service")
		if err != nil {
			return "", failf("Check(\"no.such.Service\"): %v", err)
		}
		if r.Status != arbiterpb.ServingStatusServiceUnknown {
			return "", failf("Check(\"no.such.Service\") = %v, want SERVICE_UNKNOWN", r.Status)
		}
		return "Check(\"no.such.Service\") = SERVICE_UNKNOWN", nil
	})

	// --- Echo ---------------------------------------------------------------
	c.run("echo-roundtrip", func() (string, error) {
		ctx, cancel := bg(5 * time.Second)
		defer cancel()
		blob := make([]byte, 64<<10)
		rand.New(rand.NewSource(1)).Read(blob)
		msg := "hello, arbiter \u2713 \u00e9\u4e16"
		r, err := echo(ctx, client, &arbiterpb.EchoRequest{Message: msg, Blob: blob})
		if err != nil {
			return "", failf("Echo: %v", err)
		}
		if r.Message != msg {
			return "", failf("message %q, want %q", r.Message, msg)
		}
		if !bytes.Equal(r.Blob, blob) {
			return "", failf("blob differs (%d bytes back, %d sent)", len(r.Blob), len(blob))
		}
		return fmt.Sprintf("message %q and %d-byte blob echoed", msg, len(blob)), nil
	})
	c.run("strings-with-nul", func() (string, error) {
		// protobuf-c stores strings NUL-terminated, so Arbiter cannot keep U+0000 in a
		// string field. It must refuse such input (INVALID_ARGUMENT naming the field)
		// rather than cut it short: a truncated token or service name would be a hole.
		ctx, cancel := bg(5 * time.Second)
		defer cancel()
		var bad []string
		want := func(what string, err error, field string) {
			code, m, _ := codeOf(err)
			if code != codes.InvalidArgument || !strings.Contains(m, "field "+field+" contains a NUL character") {
				bad = append(bad, fmt.Sprintf("%s: %v %q, want InvalidArgument naming field %s", what, code, m, field))
			}
		}
		_, err := echo(ctx, client, &arbiterpb.EchoRequest{Message: "before\x00after"})
		want("Echo(message with NUL)", err, "message")
		_, err = echo(ctx, client, &arbiterpb.EchoRequest{FailCode: 5, FailMessage: "no\x00pe"})
		want("Echo(fail_message with NUL)", err, "fail_message")
		name := arbiterpb.EchoService + "\x00junk"
		_, err = health(ctx, client, name)
		want("Health/Check(service with NUL)", err, "service")
		var resp arbiterpb.EchoResponse
		err = client.Call(ctx, name, arbiterpb.EchoMethod, &arbiterpb.EchoRequest{Message: "x"}, &resp)
		want("call to a service name with NUL", err, "service")
		if *expectAuth {
			anon, err := dial("")
			if err != nil {
				return "", err
			}
			defer anon.Close()
			actx := ttrpc.WithMetadata(ctx, ttrpc.MD{"authorization": {"Bearer " + *token + "\x00junk"}})
			_, err = echo(actx, anon, &arbiterpb.EchoRequest{Message: "x"})
			if code, _, _ := codeOf(err); code == codes.OK {
				bad = append(bad, "authorization \"Bearer <token>\\x00junk\" was accepted")
			}
		}
		if len(bad) > 0 {
			return "", failf("%s", strings.Join(bad, "; "))
		}
		return "NUL in message, fail_message, service names (and authorization) refused with INVALID_ARGUMENT", nil
	})
	c.run("echo-empty", func() (string, error) {
		ctx, cancel := bg(5 * time.Second)
		defer cancel()
		r, err := echo(ctx, client, &arbiterpb.EchoRequest{})
		if err != nil {
			return "", failf("Echo(empty): %v", err)
		}
		if r.Message != "" || len(r.Blob) != 0 {
			return "", failf("empty request echoed as %v", r)
		}
		return "empty request -> empty message and blob", nil
	})
	c.run("echo-metadata", func() (string, error) {
		ctx, cancel := bg(5 * time.Second)
		defer cancel()
		md := ttrpc.MD{}
		md.Set("x-request-id", "req-42")
		md.Set("x-multi", "first", "second", "third") // a repeated key; order must be kept
		md.Set("a-key", "z")
		if *token == "" {
			// No auth on this server: still check that authorization is not echoed.
			md.Set("authorization", "Bearer not-checked")
		} // else the interceptor adds the real token
		ctx = ttrpc.WithMetadata(ctx, md)
		r, err := echo(ctx, client, &arbiterpb.EchoRequest{Message: "md"})
		if err != nil {
			return "", failf("Echo: %v", err)
		}
		want := []string{"a-key=z", "x-multi=first", "x-multi=second", "x-multi=third", "x-request-id=req-42"}
		var got []string
		for _, e := range r.Metadata {
			got = append(got, e.Key+"="+e.Value)
		}
		if strings.Join(got, ",") != strings.Join(want, ",") {
			return "", failf("metadata %v, want %v (sorted by key, repeated key in sent order, no authorization)", got, want)
		}
		return fmt.Sprintf("metadata %v", got), nil
	})
	c.run("echo-deadline-propagated", func() (string, error) {
		ctx, cancel := bg(2 * time.Second)
		defer cancel()
		r, err := echo(ctx, client, &arbiterpb.EchoRequest{Message: "dl"})
		if err != nil {
			return "", failf("Echo: %v", err)
		}
		d := r.DeadlineRemainingNanos
		if d <= 0 || d > int64(2*time.Second) {
			return "", failf("deadline_remaining_nanos = %d, want in (0, 2e9]", d)
		}
		return fmt.Sprintf("deadline_remaining_nanos = %d (%v)", d, time.Duration(d)), nil
	})
	c.run("echo-no-deadline", func() (string, error) {
		r, err := echo(context.Background(), client, &arbiterpb.EchoRequest{Message: "nodl"})
		if err != nil {
			return "", failf("Echo: %v", err)
		}
		if r.DeadlineRemainingNanos != 0 {
			return "", failf("deadline_remaining_nanos = %d, want 0 (no deadline sent)", r.DeadlineRemainingNanos)
		}
		return "deadline_remaining_nanos = 0", nil
	})
	c.run("deadline-exceeded-client", func() (string, error) {
		// Context deadline 300ms (timeout_nano ~300ms on the wire), delay 2s.
		// Either the server's DEADLINE_EXCEEDED or the client's local
		// context.DeadlineExceeded may win; both are acceptable here.
		ctx, cancel := bg(300 * time.Millisecond)
		defer cancel()
		start := time.Now()
		_, err := echo(ctx, client, &arbiterpb.EchoRequest{Message: "slow", DelayMs: 2000})
		took := time.Since(start)
		if err == nil {
			return "", failf("call succeeded after %v, want DEADLINE_EXCEEDED", took)
		}
		if errors.Is(err, context.DeadlineExceeded) {
			return fmt.Sprintf("local context.DeadlineExceeded after %v (client timer won the race)", took.Round(time.Millisecond)), nil
		}
		d, e := expectStatus(err, codes.DeadlineExceeded, nil)
		if e != nil {
			return "", e
		}
		return fmt.Sprintf("server status %s after %v", d, took.Round(time.Millisecond)), nil
	})
	c.run("deadline-exceeded-server", func() (string, error) {
		// timeout_nano = 300ms on the wire, local context 20s: only the
		// server can produce DEADLINE_EXCEEDED, and it must cancel the
		// 2s delay (answer well before 2s).
		ctx, cancel := safety()
		defer cancel()
		ctx = withWireTimeout(ctx, int64(300*time.Millisecond))
		start := time.Now()
		_, err := echo(ctx, client, &arbiterpb.EchoRequest{Message: "slow", DelayMs: 2000})
		took := time.Since(start)
		d, e := expectStatus(err, codes.DeadlineExceeded, nil)
		if e != nil {
			return "", failf("%v (after %v)", e, took.Round(time.Millisecond))
		}
		if took >= 1900*time.Millisecond {
			return "", failf("%s only after %v: the delay was not cancelled by the deadline", d, took.Round(time.Millisecond))
		}
		if took < 250*time.Millisecond {
			return "", failf("%s after only %v, before the 300ms deadline", d, took.Round(time.Millisecond))
		}
		return fmt.Sprintf("%s after %v (timeout_nano=300ms, delay 2s)", d, took.Round(time.Millisecond)), nil
	})
	c.run("deadline-negative", func() (string, error) {
		ctx, cancel := safety()
		defer cancel()
		ctx = withWireTimeout(ctx, -1)
		start := time.Now()
		_, err := echo(ctx, client, &arbiterpb.EchoRequest{Message: "expired", DelayMs: 2000})
		took := time.Since(start)
		d, e := expectStatus(err, codes.DeadlineExceeded, nil)
		if e != nil {
			return "", failf("timeout_nano=-1: %v", e)
		}
		if took > time.Second {
			return "", failf("timeout_nano=-1: %s only after %v, want at once", d, took.Round(time.Millisecond))
		}
		return fmt.Sprintf("timeout_nano=-1 -> %s after %v", d, took.Round(time.Millisecond)), nil
	})
	c.run("fail-code", func() (string, error) {
		ctx, cancel := bg(5 * time.Second)
		defer cancel()
		_, err := echo(ctx, client, &arbiterpb.EchoRequest{Message: "x", FailCode: 5, FailMessage: "nope"})
		return expectStatus(err, codes.NotFound, strp("nope"))
	})
	c.run("unknown-method", func() (string, error) {
		ctx, cancel := bg(5 * time.Second)
		defer cancel()
		var resp arbiterpb.EchoResponse
		err := client.Call(ctx, arbiterpb.EchoService, "NoSuchMethod", &arbiterpb.EchoRequest{}, &resp)
		return expectStatus(err, codes.Unimplemented, strp("method NoSuchMethod"))
	})
	c.run("unknown-service", func() (string, error) {
		ctx, cancel := bg(5 * time.Second)
		defer cancel()
		var resp arbiterpb.EchoResponse
		err := client.Call(ctx, "no.such.Service", "Echo", &arbiterpb.EchoRequest{}, &resp)
		return expectStatus(err, codes.Unimplemented, strp("service no.such.Service"))
	})

	// --- Auth ---------------------------------------------------------------
	if *expectAuth {
		unauthMsg := strp("missing or invalid bearer token")
		c.run("auth-missing-token", func() (string, error) {
			anon, err := dial("")
			if err != nil {
				return "", err
			}
			defer anon.Close()
			ctx, cancel := bg(5 * time.Second)
			defer cancel()
			_, err = echo(ctx, anon, &arbiterpb.EchoRequest{Message: "anon"})
			return expectStatus(err, codes.Unauthenticated, unauthMsg)
		})
		c.run("auth-wrong-token", func() (string, error) {
			bad, err := dial(*token + "-wrong")
			if err != nil {
				return "", err
			}
			defer bad.Close()
			ctx, cancel := bg(5 * time.Second)
			defer cancel()
			_, err = echo(ctx, bad, &arbiterpb.EchoRequest{Message: "bad"})
			return expectStatus(err, codes.Unauthenticated, unauthMsg)
		})
		c.run("auth-no-bearer-scheme", func() (string, error) {
			anon, err := dial("")
			if err != nil {
				return "", err
			}
			defer anon.Close()
			ctx, cancel := bg(5 * time.Second)
			defer cancel()
			ctx = ttrpc.WithMetadata(ctx, ttrpc.MD{"authorization": {*token}})
			_, err = echo(ctx, anon, &arbiterpb.EchoRequest{Message: "no scheme"})
			return expectStatus(err, codes.Unauthenticated, unauthMsg)
		})
		c.run("auth-health-without-token", func() (string, error) {
			anon, err := dial("")
			if err != nil {
				return "", err
			}
			defer anon.Close()
			ctx, cancel := bg(5 * time.Second)
			defer cancel()
			r, err := health(ctx, anon, "")
			if err != nil {
				return "", failf("Health/Check without token: %v", err)
			}
			if r.Status != arbiterpb.ServingStatusServing {
				return "", failf("Health/Check without token = %v, want SERVING", r.Status)
			}
			return "Health/Check without token = SERVING", nil
		})
		c.run("auth-valid-token", func() (string, error) {
			ctx, cancel := bg(5 * time.Second)
			defer cancel()
			r, err := echo(ctx, client, &arbiterpb.EchoRequest{Message: "authed"})
			if err != nil {
				return "", failf("Echo with the valid token: %v", err)
			}
			if r.Message != "authed" {
				return "", failf("message %q", r.Message)
			}
			return "Echo with `authorization: Bearer <token>` succeeds", nil
		})
	}

	// --- Concurrency ----------------------------------------------------------
	c.run("concurrency-200", func() (string, error) {
		const n = 200
		ctx, cancel := bg(20 * time.Second)
		defer cancel()
		var (
			wg   sync.WaitGroup
			mu   sync.Mutex
			errs []string
		)
		for i := 0; i < n; i++ {
			wg.Add(1)
			go func(i int) {
				defer wg.Done()
				msg := fmt.Sprintf("call-%03d", i)
				blob := []byte(strings.Repeat(msg, i%7+1))
				r, err := echo(ctx, client, &arbiterpb.EchoRequest{Message: msg, Blob: blob, DelayMs: int64(i % 20)})
				mu.Lock()
				defer mu.Unlock()
				switch {
				case err != nil:
					errs = append(errs, fmt.Sprintf("%s: %v", msg, err))
				case r.Message != msg || !bytes.Equal(r.Blob, blob):
					errs = append(errs, fmt.Sprintf("%s: got answer %q", msg, r.Message))
				}
			}(i)
		}
		wg.Wait()
		if len(errs) > 0 {
			sort.Strings(errs)
			if len(errs) > 5 {
				errs = append(errs[:5], fmt.Sprintf("... %d more", len(errs)-5))
			}
			return "", failf("%d concurrent calls on one client: %s", n, strings.Join(errs, "; "))
		}
		return fmt.Sprintf("%d concurrent calls on one client, each got its own answer", n), nil
	})
	c.run("out-of-order-responses", func() (string, error) {
		// Raw: stream 1 waits 700ms, stream 3 answers at once; stream 3's
		// response must come first.
		rc, err := rawDial()
		if err != nil {
			return "", err
		}
		defer rc.Close()
		slow, _ := rawttrpc.NewRequest(arbiterpb.EchoService, arbiterpb.EchoMethod, &arbiterpb.EchoRequest{Message: "slow", DelayMs: 700}, authMD()...)
		fast, _ := rawttrpc.NewRequest(arbiterpb.EchoService, arbiterpb.EchoMethod, &arbiterpb.EchoRequest{Message: "fast"}, authMD()...)
		if err := rc.WriteRequest(1, slow); err != nil {
			return "", err
		}
		if err := rc.WriteRequest(3, fast); err != nil {
			return "", err
		}
		var order []uint32
		for i := 0; i < 2; i++ {
			f, resp, err := rc.ReadResponse(rawTimeout)
			if err != nil {
				return "", failf("reading response %d: %v", i+1, err)
			}
			if rawttrpc.Code(resp) != 0 {
				return "", failf("stream %d: status %d %q", f.StreamID, rawttrpc.Code(resp), rawttrpc.Message(resp))
			}
			order = append(order, f.StreamID)
		}
		if order[0] != 3 || order[1] != 1 {
			return "", failf("responses in stream order %v, want [3 1] (written as handlers finish)", order)
		}
		return "stream 3 (no delay) answered before stream 1 (700ms delay)", nil
	})

	// --- Limits and framing (raw socket) -------------------------------------------
	c.run("oversize-client", func() (string, error) {
		// The Go client (1.1.1) does not refuse to send > 4 MiB; the server
		// must answer RESOURCE_EXHAUSTED for that stream and keep the
		// connection.
		cl, err := dial(*token)
		if err != nil {
			return "", err
		}
		defer cl.Close()
		ctx, cancel := bg(15 * time.Second)
		defer cancel()
		_, err = echo(ctx, cl, &arbiterpb.EchoRequest{Message: "big", Blob: make([]byte, oversizeBlob)})
		code, msg, ok := codeOf(err)
		if !ok || code != codes.ResourceExhausted {
			return "", failf("5 MiB blob: want RESOURCE_EXHAUSTED, got %v", err)
		}
		re := regexp.MustCompile(`^message length (\d+) exceeds maximum message size of 4194304$`)
		if !re.MatchString(msg) {
			return "", failf("RESOURCE_EXHAUSTED as expected, but message %q, want \"message length N exceeds maximum message size of 4194304\"", msg)
		}
		r, err := echo(ctx, cl, &arbiterpb.EchoRequest{Message: "after"})
		if err != nil || r.Message != "after" {
			return "", failf("RESOURCE_EXHAUSTED ok, but the next call on the same connection failed: %v", err)
		}
		return fmt.Sprintf("RESOURCE_EXHAUSTED %q; the connection still answers", msg), nil
	})
	c.run("oversize-raw", func() (string, error) {
		rc, err := rawDial()
		if err != nil {
			return "", err
		}
		defer rc.Close()
		const n = oversizeBlob
		body := make([]byte, n)
		if err := rc.WriteRaw(rawttrpc.Header(n, 1, rawttrpc.TypeRequest, 0), body); err != nil {
			return "", failf("writing the 5 MiB frame: %v", err)
		}
		f, resp, err := rc.ReadResponse(15 * time.Second)
		if err != nil {
			return "", failf("no response to a %d-byte frame: %v", n, err)
		}
		want := fmt.Sprintf("message length %d exceeds maximum message size of %d", n, maxMessage)
		if f.StreamID != 1 || rawttrpc.Code(resp) != int32(codes.ResourceExhausted) || rawttrpc.Message(resp) != want {
			return "", failf("got stream %d status %d %q, want stream 1 status 8 %q", f.StreamID, rawttrpc.Code(resp), rawttrpc.Message(resp), want)
		}
		if err := followUp(rc, 3); err != nil {
			return "", failf("RESOURCE_EXHAUSTED ok, but then: %v", err)
		}
		return fmt.Sprintf("stream 1: RESOURCE_EXHAUSTED %q; stream 3 then answered", want), nil
	})
	c.run("even-stream-id", func() (string, error) {
		rc, err := rawDial()
		if err != nil {
			return "", err
		}
		defer rc.Close()
		req, _ := rawttrpc.NewRequest(arbiterpb.HealthService, arbiterpb.HealthCheck, &arbiterpb.HealthCheckRequest{})
		if err := rc.WriteRequest(2, req); err != nil {
			return "", err
		}
		f, resp, err := rc.ReadResponse(rawTimeout)
		if err != nil {
			return "", failf("stream 2: %v", err)
		}
		want := "StreamID must be odd for client initiated streams"
		if f.StreamID != 2 || rawttrpc.Code(resp) != int32(codes.InvalidArgument) || rawttrpc.Message(resp) != want {
			return "", failf("got stream %d status %d %q, want stream 2 status 3 %q", f.StreamID, rawttrpc.Code(resp), rawttrpc.Message(resp), want)
		}
		if err := followUp(rc, 5); err != nil {
			return "", failf("INVALID_ARGUMENT ok, but then: %v", err)
		}
		return fmt.Sprintf("stream 2: INVALID_ARGUMENT %q; stream 5 then answered", want), nil
	})
	c.run("stream-id-not-increasing", func() (string, error) {
		rc, err := rawDial()
		if err != nil {
			return "", err
		}
		defer rc.Close()
		if err := followUp(rc, 5); err != nil {
			return "", failf("stream 5: %v", err)
		}
		var got []string
		for _, id := range []uint32{5, 3} {
			req, _ := rawttrpc.NewRequest(arbiterpb.HealthService, arbiterpb.HealthCheck, &arbiterpb.HealthCheckRequest{})
			if err := rc.WriteRequest(id, req); err != nil {
				return "", err
			}
			f, resp, err := rc.ReadResponse(rawTimeout)
			if err != nil {
				return "", failf("stream %d after 5: %v", id, err)
			}
			if f.StreamID != id || rawttrpc.Code(resp) != int32(codes.InvalidArgument) {
				return "", failf("stream %d after 5: got stream %d status %d %q, want INVALID_ARGUMENT", id, f.StreamID, rawttrpc.Code(resp), rawttrpc.Message(resp))
			}
			got = append(got, fmt.Sprintf("%d: %q", id, rawttrpc.Message(resp)))
		}
		if err := followUp(rc, 7); err != nil {
			return "", failf("stream 7: %v", err)
		}
		return fmt.Sprintf("after 5, INVALID_ARGUMENT for %s; 7 answered", strings.Join(got, ", ")), nil
	})
	c.run("bad-envelope", func() (string, error) {
		rc, err := rawDial()
		if err != nil {
			return "", err
		}
		defer rc.Close()
		// An unterminated varint: not a valid protobuf message.
		if err := rc.WriteFrame(1, rawttrpc.TypeRequest, []byte{0x08, 0xff, 0xff, 0xff}); err != nil {
			return "", err
		}
		f, resp, err := rc.ReadResponse(rawTimeout)
		if err != nil {
			return "", err
		}
		if f.StreamID != 1 || rawttrpc.Code(resp) != int32(codes.InvalidArgument) || !strings.HasPrefix(rawttrpc.Message(resp), "unmarshal request error: ") {
			return "", failf("got stream %d status %d %q, want stream 1 INVALID_ARGUMENT \"unmarshal request error: ...\"", f.StreamID, rawttrpc.Code(resp), rawttrpc.Message(resp))
		}
		if err := followUp(rc, 3); err != nil {
			return "", failf("INVALID_ARGUMENT ok, but then: %v", err)
		}
		return fmt.Sprintf("INVALID_ARGUMENT %q", rawttrpc.Message(resp)), nil
	})
	c.run("bad-payload", func() (string, error) {
		rc, err := rawDial()
		if err != nil {
			return "", err
		}
		defer rc.Close()
		req, _ := rawttrpc.NewRequest(arbiterpb.EchoService, arbiterpb.EchoMethod, nil, authMD()...)
		// Field 1 (message) claims 5 bytes but only 1 follows.
		req.Payload = []byte{0x0a, 0x05, 'a'}
		if err := rc.WriteRequest(1, req); err != nil {
			return "", err
		}
		f, resp, err := rc.ReadResponse(rawTimeout)
		if err != nil {
			return "", err
		}
		if f.StreamID != 1 || rawttrpc.Code(resp) != int32(codes.InvalidArgument) || !strings.Contains(rawttrpc.Message(resp), "EchoRequest") {
			return "", failf("got stream %d status %d %q, want stream 1 INVALID_ARGUMENT naming EchoRequest", f.StreamID, rawttrpc.Code(resp), rawttrpc.Message(resp))
		}
		return fmt.Sprintf("INVALID_ARGUMENT %q", rawttrpc.Message(resp)), nil
	})
	c.run("ignored-frame-types", func() (string, error) {
		rc, err := rawDial()
		if err != nil {
			return "", err
		}
		defer rc.Close()
		if err := rc.WriteFrame(1, rawttrpc.TypeResponse, []byte("not a response at all")); err != nil {
			return "", err
		}
		if err := rc.WriteFrame(1, rawttrpc.TypeData, []byte{1, 2, 3, 4, 5}); err != nil {
			return "", err
		}
		if err := followUp(rc, 1); err != nil {
			return "", failf("after a type 2 and a type 3 frame: %v", err)
		}
		return "type 2 and 3 frames ignored; stream 1 then answered (and was the first frame back)", nil
	})
	c.run("garbage-frame-type", func() (string, error) {
		rc, err := rawDial()
		if err != nil {
			return "", err
		}
		defer rc.Close()
		if err := rc.WriteFrame(1, 7, []byte{0, 0, 0, 0}); err != nil {
			return "", err
		}
		f, err := rc.ReadFrame(rawTimeout)
		if err == nil {
			return "", failf("got a frame (stream %d type %d, %d bytes) instead of the connection being closed", f.StreamID, f.Type, f.Length)
		}
		var ne net.Error
		if errors.As(err, &ne) && ne.Timeout() {
			return "", failf("connection still open %v after a type 7 frame", rawTimeout)
		}
		if err == io.EOF || errors.Is(err, io.EOF) || strings.Contains(err.Error(), "reset") {
			return fmt.Sprintf("connection closed (%v)", err), nil
		}
		return "", failf("unexpected read error %v", err)
	})

	fmt.Printf("# %d passed, %d failed\n", c.passed, c.failed)
	if c.failed > 0 {
		os.Exit(1)
	}
}

// followUp sends Health/Check("") on stream id and expects the very next
// frame to be its SERVING response.
func followUp(rc *rawttrpc.Conn, id uint32) error {
	req, _ := rawttrpc.NewRequest(arbiterpb.HealthService, arbiterpb.HealthCheck, &arbiterpb.HealthCheckRequest{})
	if err := rc.WriteRequest(id, req); err != nil {
		return fmt.Errorf("writing stream %d: %v", id, err)
	}
	f, resp, err := rc.ReadResponse(rawTimeout)
	if err != nil {
		return fmt.Errorf("stream %d: %v", id, err)
	}
	if f.StreamID != id {
		return fmt.Errorf("next frame is for stream %d, want %d", f.StreamID, id)
	}
	if rawttrpc.Code(resp) != 0 {
		return fmt.Errorf("stream %d: status %d %q", id, rawttrpc.Code(resp), rawttrpc.Message(resp))
	}
	var hr arbiterpb.HealthCheckResponse
	if err := proto.Unmarshal(resp.Payload, &hr); err != nil {
		return fmt.Errorf("stream %d: payload: %v", id, err)
	}
	if hr.Status != arbiterpb.ServingStatusServing {
		return fmt.Errorf("stream %d: %v, want SERVING", id, hr.Status)
	}
	return nil
}
