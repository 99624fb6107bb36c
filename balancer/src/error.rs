//! The crate's error type: one enum, variants named for the reason.

use std::fmt;
use std::io;
use std::path::PathBuf;

/// Errors of the balancer library.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The config file could not be read.
    #[error("{}: cannot read config: {source}", path.display())]
    ConfigRead {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// The config text is not valid TOML, has an unknown key or a wrong
    /// type, or fails semantic validation. The error names file, line,
    /// column and key.
    #[error("{0}")]
    Config(Box<ConfigError>),

    /// The control socket could not be created (parent directory, stale
    /// socket removal, bind, permissions).
    #[error("control socket {}: cannot {action}: {source}", path.display())]
    ControlSocketSetup {
        path: PathBuf,
        action: &'static str,
        #[source]
        source: io::Error,
    },
    /// The client could not connect to the control socket.
    #[error("control socket {}: cannot connect (is `balancer run` running?): {source}", path.display())]
    ControlConnect {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// Reading or writing the control socket failed.
    #[error("control socket {}: {source}", path.display())]
    ControlIo {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// A request or response line is not the JSON the protocol expects.
    #[error("control socket: malformed message: {message}")]
    ControlProtocol { message: String },
    /// The server understood the request and refused it.
    #[error("control socket: server answered: {message}")]
    ControlRefused { message: String },

    /// A command of the setup plan could not be started.
    #[error("`{command}`: cannot run: {source}")]
    CommandSpawn {
        command: String,
        #[source]
        source: io::Error,
    },
    /// A command of the setup plan exited unsuccessfully.
    #[error("`{command}` failed ({status}): {stderr}")]
    CommandFailed {
        command: String,
        status: String,
        stderr: String,
    },
    /// The output of `ip -j` or `nft -j` could not be understood.
    #[error("`{command}`: unexpected output: {message}")]
    CommandOutput { command: String, message: String },
    /// A sysctl could not be read or written under /proc/sys.
    #[error("sysctl {key}: {source}")]
    Sysctl {
        key: String,
        #[source]
        source: io::Error,
    },
}

impl From<ConfigError> for Error {
    fn from(e: ConfigError) -> Self {
        Error::Config(Box::new(e))
    }
}

/// `Result` with the crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Why a config was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum ConfigErrorKind {
    /// Not TOML.
    Syntax,
    /// A key the schema does not know.
    UnknownKey,
    /// A required key is absent.
    MissingKey,
    /// A value of the wrong type or an unknown enum value.
    WrongType,
    /// A number or duration outside its allowed range.
    OutOfRange,
    /// An address, network, seed or name that does not parse.
    BadValue,
    /// An interface name the kernel would refuse.
    BadInterfaceName,
    /// `front` and `back` (or the TUN) name the same device.
    SameInterface,
    /// The back gateway is the subnet's network or broadcast address.
    BadGateway,
    /// No `[[service]]`.
    NoService,
    /// Two services with the same vip, port and protocol.
    DuplicateService,
    /// Two services or two backends of a service with the same name.
    DuplicateName,
    /// A service without a backend.
    NoBackend,
    /// Two backends of a service with the same address and port.
    DuplicateBackend,
    /// More than one `local` backend in a service.
    SecondLocalBackend,
    /// A `local` backend with an `address`.
    LocalWithAddress,
    /// A nat or dr backend without an `address`.
    MissingAddress,
    /// A nat or dr backend outside the back_gateway subnet.
    BackendOffLink,
    /// A backend address equal to the back gateway.
    BackendIsGateway,
    /// A VIP inside the back_gateway subnet.
    VipInBackSubnet,
    /// A pool or autoscale section without the `[feedback]` it needs.
    NeedsFeedback,
    /// A dr or local backend port different from the service port.
    PortMismatch,
    /// Keys that contradict each other (a setting for another mode, a
    /// timeout longer than its interval, a mark above its limit).
    Inconsistent,
    /// More than one sorry server in a service.
    SecondSorryBackend,
    /// Every backend of a service is a sorry server.
    NoRegularBackend,
}

/// A config error located in the file: renders as
/// `FILE:LINE:COLUMN: KEY: message`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub file: PathBuf,
    /// 1-based.
    pub line: usize,
    /// 1-based, in characters.
    pub column: usize,
    /// Dotted key path such as `service[1].backend[0].weight`.
    pub key: String,
    pub kind: ConfigErrorKind,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}:{}:{}: {}: {}",
            self.file.display(),
            self.line,
            self.column,
            self.key,
            self.message
        )
    }
}

impl std::error::Error for ConfigError {}
