// Package arbiterpb holds hand-written Go types for the Arbiter conformance
// protos (Protos/health.proto, Protos/echo.proto).
//
// containerd/ttrpc 1.1.1 marshals with github.com/gogo/protobuf/proto, whose
// reflection-based (table-driven) marshaller only needs a type implementing
// proto.Message (Reset/String/ProtoMessage) whose fields carry `protobuf:"..."`
// struct tags — the same approach ttrpc itself uses for its envelope types in
// types.go. No protoc run is needed.
package arbiterpb

import "fmt"

// Fully qualified service names and method names.
const (
	HealthService = "grpc.health.v1.Health"
	HealthCheck   = "Check"
	EchoService   = "arbiter.echo.v1.Echo"
	EchoMethod    = "Echo"
)

// ServingStatus is grpc.health.v1.HealthCheckResponse.ServingStatus.
type ServingStatus int32

const (
	ServingStatusUnknown        ServingStatus = 0
	ServingStatusServing        ServingStatus = 1
	ServingStatusNotServing     ServingStatus = 2
	ServingStatusServiceUnknown ServingStatus = 3
)

func (s ServingStatus) String() string {
	switch s {
	case ServingStatusUnknown:
		return "UNKNOWN"
	case ServingStatusServing:
		return "SERVING"
	case ServingStatusNotServing:
		return "NOT_SERVING"
	case ServingStatusServiceUnknown:
		return "SERVICE_UNKNOWN"
	}
	return fmt.Sprintf("ServingStatus(%d)", int32(s))
}

// HealthCheckRequest is grpc.health.v1.HealthCheckRequest.
type HealthCheckRequest struct {
	Service string `protobuf:"bytes,1,opt,name=service,proto3"`
}

func (m *HealthCheckRequest) Reset()         { *m = HealthCheckRequest{} }
func (m *HealthCheckRequest) String() string { return fmt.Sprintf("%+v", *m) }
func (*HealthCheckRequest) ProtoMessage()    {}

// HealthCheckResponse is grpc.health.v1.HealthCheckResponse.
type HealthCheckResponse struct {
	Status ServingStatus `protobuf:"varint,1,opt,name=status,proto3"`
}

func (m *HealthCheckResponse) Reset()         { *m = HealthCheckResponse{} }
func (m *HealthCheckResponse) String() string { return fmt.Sprintf("%+v", *m) }
func (*HealthCheckResponse) ProtoMessage()    {}

// EchoRequest is arbiter.echo.v1.EchoRequest.
type EchoRequest struct {
	Message     string `protobuf:"bytes,1,opt,name=message,proto3"`
	DelayMs     int64  `protobuf:"varint,2,opt,name=delay_ms,proto3"`
	FailCode    int32  `protobuf:"varint,3,opt,name=fail_code,proto3"`
	FailMessage string `protobuf:"bytes,4,opt,name=fail_message,proto3"`
	Blob        []byte `protobuf:"bytes,5,opt,name=blob,proto3"`
}

func (m *EchoRequest) Reset() { *m = EchoRequest{} }
func (m *EchoRequest) String() string {
	return fmt.Sprintf("EchoRequest{Message:%q DelayMs:%d FailCode:%d FailMessage:%q Blob:%d bytes}",
		m.Message, m.DelayMs, m.FailCode, m.FailMessage, len(m.Blob))
}
func (*EchoRequest) ProtoMessage() {}

// MetadataEntry is arbiter.echo.v1.MetadataEntry.
type MetadataEntry struct {
	Key   string `protobuf:"bytes,1,opt,name=key,proto3"`
	Value string `protobuf:"bytes,2,opt,name=value,proto3"`
}

func (m *MetadataEntry) Reset()         { *m = MetadataEntry{} }
func (m *MetadataEntry) String() string { return fmt.Sprintf("%s=%s", m.Key, m.Value) }
func (*MetadataEntry) ProtoMessage()    {}

// EchoResponse is arbiter.echo.v1.EchoResponse.
type EchoResponse struct {
	Message                string           `protobuf:"bytes,1,opt,name=message,proto3"`
	Metadata               []*MetadataEntry `protobuf:"bytes,2,rep,name=metadata,proto3"`
	DeadlineRemainingNanos int64            `protobuf:"varint,3,opt,name=deadline_remaining_nanos,proto3"`
	Blob                   []byte           `protobuf:"bytes,4,opt,name=blob,proto3"`
}

func (m *EchoResponse) Reset() { *m = EchoResponse{} }
func (m *EchoResponse) String() string {
	return fmt.Sprintf("EchoResponse{Message:%q Metadata:%v DeadlineRemainingNanos:%d Blob:%d bytes}",
		m.Message, m.Metadata, m.DeadlineRemainingNanos, len(m.Blob))
}
func (*EchoResponse) ProtoMessage() {}

// Identity service (Protos/identity.proto, Protos/common.proto): the messages the
// benchmark needs. Fields not declared here are skipped when decoding.
const (
	IdentityService = "arbiter.identity.v1.Identity"
	IdentityResolve = "Resolve"
	IdentityLink    = "Link"
)

// Identifier is arbiter.common.v1.Identifier.
type Identifier struct {
	Type  string `protobuf:"bytes,1,opt,name=type,proto3"`
	Value string `protobuf:"bytes,2,opt,name=value,proto3"`
}

func (m *Identifier) Reset()         { *m = Identifier{} }
func (m *Identifier) String() string { return fmt.Sprintf("%+v", *m) }
func (*Identifier) ProtoMessage()    {}

// ResolveRequest is arbiter.identity.v1.ResolveRequest.
type ResolveRequest struct {
	Identifiers     []*Identifier `protobuf:"bytes,1,rep,name=identifiers,proto3"`
	CreateIfMissing bool          `protobuf:"varint,2,opt,name=create_if_missing,json=createIfMissing,proto3"`
}

func (m *ResolveRequest) Reset()         { *m = ResolveRequest{} }
func (m *ResolveRequest) String() string { return fmt.Sprintf("%+v", *m) }
func (*ResolveRequest) ProtoMessage()    {}

// ResolveResponse is arbiter.identity.v1.ResolveResponse (person_id only).
type ResolveResponse struct {
	PersonId string `protobuf:"bytes,1,opt,name=person_id,json=personId,proto3"`
}

func (m *ResolveResponse) Reset()         { *m = ResolveResponse{} }
func (m *ResolveResponse) String() string { return fmt.Sprintf("%+v", *m) }
func (*ResolveResponse) ProtoMessage()    {}

// LinkRequest is arbiter.identity.v1.LinkRequest.
type LinkRequest struct {
	Identifiers  []*Identifier `protobuf:"bytes,1,rep,name=identifiers,proto3"`
	Source       string        `protobuf:"bytes,2,opt,name=source,proto3"`
	ObservedAtMs int64         `protobuf:"varint,3,opt,name=observed_at_ms,json=observedAtMs,proto3"`
}

func (m *LinkRequest) Reset()         { *m = LinkRequest{} }
func (m *LinkRequest) String() string { return fmt.Sprintf("%+v", *m) }
func (*LinkRequest) ProtoMessage()    {}

// LinkResponse is arbiter.identity.v1.LinkResponse (person_id only).
type LinkResponse struct {
	PersonId string `protobuf:"bytes,1,opt,name=person_id,json=personId,proto3"`
}

func (m *LinkResponse) Reset()         { *m = LinkResponse{} }
func (m *LinkResponse) String() string { return fmt.Sprintf("%+v", *m) }
func (*LinkResponse) ProtoMessage()    {}
