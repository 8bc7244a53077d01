pub mod subnet_env;
